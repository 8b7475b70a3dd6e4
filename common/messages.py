"""Every record that crosses a process boundary, and nothing else.

A wire message is a multipart frame list: frame 0 is one of the tagged structs below,
msgpack-encoded (msgspec); frames 1..n are tensor bytes that ``Inline`` refs point at by
index. One message carries every request or reply that was ready for one peer when its
sender woke (see DESIGN.md, "The hot path"), so the batch records hold lists.

Rules: add fields at the end with defaults; bump ``PROTOCOL_VERSION`` when a peer of the
old version could not understand a message; structs are ``array_like`` so headers stay
small and cheap to encode.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from despina.common import control

PROTOCOL_VERSION = 2

ParamValue = bool | int | float | str


# --- tensor references ------------------------------------------------------------


class Inline(msgspec.Struct, tag="i", array_like=True):
    """The tensor's bytes are frame ``frame`` of the same message."""

    frame: int


class Shm(msgspec.Struct, tag="s", array_like=True):
    """The tensor's bytes are in the system shared-memory object ``key`` (a name under
    /dev/shm), at ``offset``, ``size`` bytes long."""

    key: str
    offset: int
    size: int


class Region(msgspec.Struct, tag="r", array_like=True):
    """A client-registered shared-memory region, by its registered name, as a frontend
    sends it; the scheduler checks it against the registry and turns it into ``Shm``."""

    name: str
    offset: int
    size: int


class CudaIpc(msgspec.Struct, tag="c", array_like=True):
    """A block of a client's GPU memory, by its CUDA IPC handle (cudaIpcMemHandle_t)."""

    handle: bytes
    device_id: int
    offset: int
    size: int


TensorRef = Inline | Shm | Region | CudaIpc


class Tensor(msgspec.Struct, array_like=True):
    name: str
    datatype: str
    shape: list[int]
    ref: TensorRef


class Error(msgspec.Struct, array_like=True):
    code: str  # errors.Code value
    message: str


# --- requests and replies -----------------------------------------------------------


class Infer(msgspec.Struct, array_like=True):
    """One inference request. ``rid`` is its sending frontend's id for it; the scheduler
    fills ``sid`` (its own id, unique while in flight) and ``reply_to`` (the frontend's
    reply endpoint) before handing it to a backend host. A request a frontend sends a
    host directly (see ``Routes``) rides an ``Execution`` marked ``direct``; its ``sid``
    stays 0."""

    rid: int
    model: str
    version: str
    inputs: list[Tensor]
    outputs: list[str]
    parameters: dict[str, ParamValue]
    request_id: str = ""
    sid: int = 0
    reply_to: str = ""
    # Outputs the client wants written into its shared memory: Region from a frontend,
    # Shm once the scheduler resolved it. The reply then carries the Shm ref, no bytes.
    output_targets: dict[str, TensorRef] = {}
    # Outputs to return as their top-k classes (Triton's classification extension).
    classification: dict[str, int] = {}
    # A traced request only (services/frontend/trace.py): the trace timestamps taken on
    # the way, (name, wall-clock ns) in order; the scheduler adds QUEUE_START, the backend
    # host its QUEUE_START (direct routes) and COMPUTE_*, and the reply brings them back.
    trace: list[tuple[str, int]] | None = None
    # The call takes several responses (a gRPC stream): a decoupled model answers it
    # through its response sender; a decoupled model refuses a request without it.
    stream: bool = False


# ``InferReply.part``: the request's only or last response (every non-decoupled reply);
# one response of several, more follow; the end of a decoupled request's responses, no
# response in it (a FINAL flag sent without one); a decoupled request's last response.
PART_LAST = 0
PART_MORE = 1
PART_EMPTY_FINAL = 2
PART_FINAL = 3  # a decoupled request's last response, sent with the FINAL flag


class InferReply(msgspec.Struct, array_like=True):
    rid: int
    model: str = ""
    version: str = ""
    outputs: list[Tensor] = []
    error: Error | None = None
    trace: list[tuple[str, int]] | None = None  # the request's ``Infer.trace``, stamped
    part: int = PART_LAST  # PART_*: a decoupled model's responses


# --- frontend <-> scheduler -------------------------------------------------------------


class FrontendHello(msgspec.Struct, tag="fe_hello", array_like=True):
    protocol: int
    reply_endpoint: str  # where backend hosts send this frontend's replies


class InferBatch(msgspec.Struct, tag="infer", array_like=True):
    reply_to: str  # the sending frontend's reply endpoint
    requests: list[Infer]


QueryKind = Literal[
    "server_ready",
    "model_ready",
    "model_metadata",
    "model_config",
    "repository_index",
    "shm_status",  # model: the region name, "" for all
    "shm_register",  # body: {"name", "key", "offset", "byte_size"}
    "shm_unregister",  # model: the region name, "" for all
    "cuda_shm_status",
    "cuda_shm_register",  # body: {"name", "raw_handle" (bytes, base64), "device_id", "byte_size"}
    "cuda_shm_unregister",
    # Model control (services/scheduler/model_control.py), answered once done; body:
    # the request's parameters as JSON ({"config": str, "file:<v>/<name>": base64 str,
    # "unload_dependents": bool}).
    "repository_load",
    "repository_unload",
    # The logging and trace extensions (services/scheduler/settings_store.py); body: the
    # update's JSON as the HTTP extension spells it, empty to read; trace_setting's
    # model: the model, "" for the global settings.
    "log_settings",
    "trace_setting",
    "statistics",  # model, version: "" for every ready model version (or every version)
]


class Query(msgspec.Struct, tag="query", array_like=True):
    """A control-plane question to the scheduler; answered by one ``QueryReply``."""

    qid: int
    kind: QueryKind
    model: str = ""
    version: str = ""
    body: bytes = b""  # JSON arguments, for the kinds that take them


class QueryReply(msgspec.Struct, tag="query_reply", array_like=True):
    qid: int
    body: bytes = b""  # unused since the typed ``record``; kept so old peers still decode
    error: Error | None = None
    record: control.Record | None = None  # the answer (common/control.py); None: yes / done


class Signature(msgspec.Struct, array_like=True):
    """What a request to a model must look like (from its config): checked by whoever
    accepts the request, the scheduler or a frontend on a direct route."""

    name: str
    max_batch_size: int
    inputs: dict[str, tuple[str, list[int]]]  # name -> (datatype, dims without batch)
    required: list[str]
    outputs: list[str]


class Route(msgspec.Struct, array_like=True):
    """A ready model version that needs no scheduling decision beyond "a free instance"
    (Triton's default scheduler, or a dynamic batcher without priorities or queue
    policies: the backend host batches what it is sent; no sequences, ensemble, cache)."""

    model: str
    version: str
    default: bool  # what a request naming no version runs on
    signature: Signature
    instances: list[tuple[str, int]]  # (host_id, instance index)


class Routes(msgspec.Struct, tag="routes", array_like=True):
    """Scheduler -> frontend, whole, whenever it changes: the model versions the frontend
    may send straight to a backend host over that host's link (``HostLink``), keeping the
    scheduler off the request's path. Everything else goes through the scheduler."""

    routes: list[Route]


class ReplyBatch(msgspec.Struct, tag="replies", array_like=True):
    """Replies for one frontend: from the backend host that ran them, or from the
    scheduler for requests it refused or that died with their host."""

    replies: list[InferReply]


# --- scheduler <-> backend host -----------------------------------------------------------


class HostHello(msgspec.Struct, tag="host_hello", array_like=True):
    """A backend host's first message on its stream to the scheduler. The stream is the
    host's identity: when it closes, the host is gone."""

    protocol: int
    host_id: str
    framework: str
    pid: int
    # Set by a Python instance process: the one instance it runs ("model", "version", index)
    # and, if initialize() failed, why.
    instance_of: tuple[str, str, int] | None = None
    load_error: str = ""


class LoadModel(msgspec.Struct, tag="load", array_like=True):
    model: str
    version: str
    model_dir: str
    config: bytes  # ModelConfig, serialized protobuf
    instances: list[int]  # instance indexes this host must create


class UnloadModel(msgspec.Struct, tag="unload", array_like=True):
    model: str
    version: str
    instances: list[int] | None = None  # the indexes to stop; None: every instance


# The instance indexes of a model version's load ``g`` (services/scheduler/model_control.py)
# start at ``g * INSTANCE_STRIDE``: a reload's new instances run beside the old ones on
# one host until the old ones retire.
INSTANCE_STRIDE = 1000


class LoadResult(msgspec.Struct, tag="load_result", array_like=True):
    model: str
    version: str
    instances: list[
        int
    ]  # indexes now running here (instances of other processes report themselves)
    error: str = ""
    # The config as the backend completed it at load (Triton's auto-complete), serialized
    # ModelConfig; empty when the host changed nothing.
    config: bytes = b""


class Execution(msgspec.Struct, array_like=True):
    """One batch for one model instance. ``direct``: a frontend sent it straight to the
    host (a direct route): no scheduler tracks its requests, so no ``Completion`` names
    them, and the host may batch them with other direct requests of the instance."""

    model: str
    version: str
    instance: int
    requests: list[Infer]
    direct: bool = False


class ExecuteBatch(msgspec.Struct, tag="exec", array_like=True):
    executions: list[Execution]


class Completion(msgspec.Struct, tag="done", array_like=True):
    """The host finished these executions (replies already went to the frontends)."""

    host_id: str
    done: list[tuple[str, str, int, list[int]]]  # (model, version, instance, [sid...])
    # Replies that could not reach their frontend, as (reply_to, rid, model, version):
    # the scheduler answers those requests with an error over its own socket.
    undelivered: list[tuple[str, int, str, str]] = []


class Introduce(msgspec.Struct, tag="introduce", array_like=True):
    """Scheduler -> backend host: open a link to each of these frontends' reply
    endpoints now (not at the first reply), so they can send direct requests."""

    endpoints: list[str]


class HostLink(msgspec.Struct, tag="host_link", array_like=True):
    """Backend host -> frontend, first on the link it opened to the frontend's reply
    endpoint: the link is this host's. The frontend sends it ``ExecuteBatch`` for the
    instances ``Routes`` lists, and ``Release`` for output blocks; replies come back on it."""

    host_id: str


class Release(msgspec.Struct, tag="release", array_like=True):
    """Frontend -> backend host, on the stream the replies came by: these output blocks
    of the host's arena have been sent to the client and may be reused."""

    blocks: list[tuple[str, int]]  # (key, offset)


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The clients of these requests went away (closed connection, RST_STREAM, deadline):
    frontend -> scheduler or -> backend host (on the host's link), and scheduler -> host
    for requests it already sent there. ``reply_to`` and ``rid`` name each request as its
    frontend knows it. Whoever holds a request that has not started drops it and answers
    it with a CANCELLED error (the frontend only frees the request's blocks then); one
    that has started runs to its end."""

    reply_to: str
    rids: list[int]


class Settings(msgspec.Struct, tag="settings", array_like=True):
    """Scheduler -> every frontend and backend host, when it joins and whenever they
    change: the logging extension's settings (common/logs.py) and the trace settings
    (services/frontend/trace.py): ``trace[""]`` the global ones, ``trace[model]`` a
    model's own fields (the others fall back to the global ones)."""

    log: dict[str, ParamValue]
    trace: dict[str, dict[str, list[str]]] = {}


class StatsReport(msgspec.Struct, tag="stats", array_like=True):
    """Frontend or backend host -> scheduler, at most every common/stats.FLUSH_S while
    there is something new: the counts it added since its last report, per model
    version (common/stats.py says who counts what); the scheduler adds them up. Also
    the answer to a ``StatsFlush``, sent at once and even when empty: ``flushed`` its
    token (0: a report of the reporter's own timing)."""

    models: list[control.ModelStatistics]
    flushed: int = 0


class StatsFlush(msgspec.Struct, tag="stats_flush", array_like=True):
    """Scheduler -> every frontend and backend host, when a statistics query arrives:
    send what you counted now (a ``StatsReport`` with ``flushed`` = ``token``), so the
    answer counts every request answered before the query."""

    token: int


class Heartbeat(msgspec.Struct, tag="beat", array_like=True):
    """Backend host -> scheduler, every ``--host-heartbeat-interval-ms``, from a thread
    of the host's own on a stream of its own (services/backend_host/heartbeat.py): the
    process still runs. A host that sent one and then goes silent for
    ``--host-heartbeat-timeout-ms`` is gone (services/scheduler/liveness.py)."""

    host_id: str


class HostGone(msgspec.Struct, tag="host_gone", array_like=True):
    """Scheduler -> every frontend: this backend host is gone (its stream closed, or it
    stopped answering); the requests a frontend sent it directly fail now, and nothing
    more goes to it until it joins again."""

    host_id: str
    why: str  # "exited", "stopped answering (no heartbeat for 2.1 s)"


# What each socket may receive: one decoder per socket.
SchedulerFromFrontend = FrontendHello | InferBatch | Query | Cancel | StatsReport
SchedulerFromHost = HostHello | LoadResult | Completion | StatsReport | Heartbeat
FrontendInbound = ReplyBatch | QueryReply | Routes | HostLink | Settings | HostGone | StatsFlush
HostInbound = LoadModel | UnloadModel | ExecuteBatch | Introduce | Cancel | Settings | StatsFlush
HostFromFrontend = Release | ExecuteBatch | Cancel


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def decoder(kind: object) -> msgspec.msgpack.Decoder:
    """One decoder per socket, typed with the union of what that socket may receive."""
    return msgspec.msgpack.Decoder(kind)
