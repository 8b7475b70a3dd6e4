"""Protocol-neutral operations that both the HTTP and gRPC frontends call.

Handlers decode their protocol into ``inference`` records, call one method here, and
encode what comes back; errors are ``ServerError`` and are mapped to a status only at
the protocol edge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import orjson

from despina.common import control, logs
from despina.common import messages as m
from despina.common.errors import ServerError, invalid_arg
from despina.services.frontend import control as encode
from despina.services.frontend.call import InferCall
from despina.services.frontend.inference import InferenceRequest, InferenceResult
from despina.services.frontend.placement import BodyBlock
from despina.services.frontend.scheduler_client import SchedulerClient
from despina.services.frontend.trace import Tracer
from despina.services.identity import TRITON_NAME, TRITON_VERSION

# Triton's clients check the name (services/identity.py); ``--server-name`` sets another.
SERVER_NAME = TRITON_NAME
SERVER_VERSION = TRITON_VERSION
# The Triton protocol extensions that work today, with Triton's names, in Triton's order;
# the list grows with each feature. Left out: sequence, schedule_policy (priority and
# timeout parameters are not acted on), and
# cuda_shared_memory: built but never yet run on a GPU, and refused (501) where no GPU or
# cupy is present, so a client that picks its path from this list would be sent down an
# unproven one. model_repository: index, load and unload (services/scheduler/model_control.py;
# refused as Triton refuses them outside model-control mode explicit).
EXTENSIONS = [
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "system_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "trace",
    "logging",
]


# A load waits for the model's instances (a Python model starts processes), an unload
# for the model's requests: longer than a query's wait (the scheduler bounds both).
CONTROL_TIMEOUT_S = 600.0


def repository_parameters(body: bytes) -> dict:
    """The ``parameters`` object of a repository load / unload body (HTTP JSON:
    ``{"parameters": {...}}``; an empty body has none). Raises INVALID_ARG."""
    if not body:
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_arg(f"failed to parse the request JSON: {exc}") from None
    parameters = doc.get("parameters", {}) if isinstance(doc, dict) else None
    if not isinstance(parameters, dict):
        raise invalid_arg("the request body must be a JSON object with a 'parameters' object")
    return parameters


def index_ready(body: bytes) -> bool:
    """The ``ready`` flag of a repository index body (HTTP JSON ``{"ready": true}``).
    Raises INVALID_ARG."""
    if not body:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_arg(f"failed to parse the request JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid_arg("the repository index request must be a JSON object")
    ready = doc.get("ready", False)
    if type(ready) is not bool:
        raise invalid_arg("'ready' of the repository index request must be a boolean")
    return ready


log = logging.getLogger("despina.frontend")


class DataPlane:
    def __init__(
        self, client: SchedulerClient, server_name: str = SERVER_NAME, statistics: bool = True
    ) -> None:
        """``server_name``: the name the server metadata gives (Triton's clients expect
        "triton"); ``statistics``: whether statistics are counted (--allow-metrics), else
        the extension is not listed."""
        self.client = client
        extensions = [e for e in EXTENSIONS if statistics or e != "statistics"]
        self.metadata = control.ServerMetadata(server_name, SERVER_VERSION, extensions)
        # The trace extension (trace.py); the scheduler's settings arrive in _on_settings.
        self.tracer = Tracer()
        # Whether some trace level is on: the protocols then stamp each request's receipt
        # (``InferCall.proto``) for the sampled ones; ``on_tracing`` listeners are told
        # each change (the gRPC transport's own flag).
        self.tracing = False
        self.on_tracing: list[Callable[[bool], None]] = []
        client.settings_listeners.append(self._on_settings)
        if client.settings is not None:
            self._on_settings(client.settings)
        self._server_metadata = encode.server_metadata_json(self.metadata)

    @staticmethod
    def live() -> bool:
        return True

    async def ready(self) -> bool:
        try:
            await self.client.query("server_ready")
        except ServerError:
            return False
        return True

    def server_metadata(self) -> bytes:
        return self._server_metadata

    async def model_ready(self, model: str, version: str = "") -> bool:
        try:
            await self.client.query("model_ready", model, version)
        except ServerError:
            return False
        return True

    async def model_metadata(self, model: str, version: str = "") -> control.ModelMetadata:
        record = await self.client.query("model_metadata", model, version)
        return control.expect(record, control.ModelMetadata)

    async def model_config(self, model: str, version: str = "") -> control.ModelConfig:
        record = await self.client.query("model_config", model, version)
        return control.expect(record, control.ModelConfig)

    async def statistics(self, model: str = "", version: str = "") -> control.Statistics:
        """The statistics extension: every ready model version's totals (``model`` ""),
        or one model's (its ready versions, or ``version``). Raises the metadata
        query's errors for a model or version that is not there."""
        record = await self.client.query("statistics", model, version)
        return control.expect(record, control.Statistics)

    async def repository_index(self, ready: bool = False) -> control.RepositoryIndex:
        """Every model of the repositories; ``ready``: the READY versions only."""
        record = control.expect(
            await self.client.query("repository_index"), control.RepositoryIndex
        )
        if ready:
            record.models = [e for e in record.models if e.state == "READY"]
        return record

    async def repository_load(self, model: str, parameters: dict) -> None:
        """Load (or reload) ``model``; returns once it serves. ``parameters``: Triton's
        load parameters, ``config`` (JSON text) and ``file:<version>/<name>`` (base64
        text). Raises the scheduler's ServerError (UNSUPPORTED outside explicit mode)."""
        body = orjson.dumps(parameters)
        await self.client.query("repository_load", model, body=body, timeout=CONTROL_TIMEOUT_S)

    async def repository_unload(self, model: str, parameters: dict) -> None:
        """Unload ``model`` once its requests are done; ``parameters``:
        ``unload_dependents`` (bool)."""
        body = orjson.dumps(parameters)
        await self.client.query("repository_unload", model, body=body, timeout=CONTROL_TIMEOUT_S)

    # --- inference: decode, start, encode (services/frontend/call.py) ---------------------

    def call(self, body: BodyBlock | None = None) -> InferCall:
        """A new inference call, owning ``body`` (the block the transport read the
        request into, if any). Whatever happens next, its handler ``close()``s it once,
        after encoding (or failing)."""
        return self.client.call(body)

    def start(self, call: InferCall, request: InferenceRequest) -> InferCall:
        """Send ``request`` as ``call`` and return the call: a future of the
        ``InferenceResult`` (output bytes may be views into a backend host's shared
        memory, valid until the call closes). Raises ServerError at once for what is
        refused before sending."""
        return self.client.send(call, request)

    async def infer(self, call: InferCall, request: InferenceRequest) -> InferenceResult:
        """``start`` and wait: for handlers that are coroutines."""
        return await self.start(call, request)

    # --- logging and trace extensions (settings held by the scheduler) -------------------

    async def log_settings(self, update: bytes = b"") -> control.LogSettings:
        """The logging settings, after applying ``update`` (the HTTP JSON object; empty:
        read only). The scheduler applies a change in every process before answering."""
        record = await self.client.query("log_settings", body=update)
        return control.expect(record, control.LogSettings)

    async def trace_setting(self, model: str = "", update: bytes = b"") -> control.TraceSettings:
        """``model``'s trace settings ("": the global ones), after ``update`` (the HTTP
        JSON object, a field ``null`` clears it; empty: read only)."""
        record = await self.client.query("trace_setting", model, body=update)
        return control.expect(record, control.TraceSettings)

    def _on_settings(self, msg: m.Settings) -> None:
        """The scheduler's logging and trace settings: applied to this process. ``start``
        is the plain one unless tracing or verbose logging is on (no cost otherwise)."""
        logs.apply(msg.log)
        self.tracer.update(msg.trace)
        self.tracing = self.tracer.active
        for listener in self.on_tracing:
            listener(self.tracing)
        if self.tracer.active:
            self.start = self._start_traced  # type: ignore[method-assign]
        elif logs.verbose():
            self.start = self._start_logged  # type: ignore[method-assign]
        else:
            self.__dict__.pop("start", None)

    def _start_logged(self, call: InferCall, request: InferenceRequest) -> InferCall:
        log.debug("infer %s:%s id '%s'", request.model, request.version, request.id)
        return self.client.send(call, request)

    def _start_traced(self, call: InferCall, request: InferenceRequest) -> InferCall:
        """``start``, tracing the requests the tracer samples (trace.py)."""
        if logs.verbose():
            log.debug("infer %s:%s id '%s'", request.model, request.version, request.id)
        record = self.tracer.sample(request.model, request.id)
        if record is None:
            call.proto = None  # not traced: its protocol has nothing to report
            return self.client.send(call, request)
        # the wire carries it: Infer.trace
        call.trace = self.tracer.start(record, request, call.proto)
        self.client.send(call, request)
        call.add_done_callback(partial(self._traced, request, record))
        return call

    def _traced(self, request: InferenceRequest, record: dict, call: InferCall) -> None:
        """The traced call is answered (before its handler closes it: the outputs are
        still readable). Filed now, or once its protocol sent the answer (``trace_sent``)
        when that protocol stamped its receipt (``call.proto``)."""
        if call.cancelled():
            return
        version, result = request.version, None
        if call.exception() is None:
            result = call.result()
            version = result.version or version
        later = call.proto is not None
        self.tracer.finish(request.model, record, version, call.trace, result, file=not later)
        if later:
            call.traced = (request.model, record)

    def trace_sent(self, call: InferCall, protocol: str, start_ns: int) -> None:
        """A protocol that stamped a traced call's receipt (``call.proto``) sent its
        answer, from ``start_ns`` (before encoding it) to now: the trace gets
        ``protocol``'s SEND_START and SEND_END and is filed (``start_ns`` 0: nothing of
        its own was written, filed without them). A protocol calls this for every call
        it set ``proto`` on, whatever the answer (nothing when not traced)."""
        traced = call.traced
        if traced is not None:
            call.traced = None
            self.tracer.sent(traced[0], traced[1], protocol, start_ns)

    def body_block(self, size: int) -> BodyBlock | None:
        """Shared memory to read a large request body into, or None: the transport owns
        it until it hands it to a ``call``, and ``release_body``s it if it never does."""
        return self.client.body_block(size)

    def release_body(self, block: BodyBlock | None) -> None:
        self.client.release_body(block)

    # --- shared memory (the registry lives in the scheduler, shared by all frontends) ----

    async def shm_status(
        self, cuda: bool, name: str = ""
    ) -> control.ShmStatus | control.CudaShmStatus:
        record = await self.client.query("cuda_shm_status" if cuda else "shm_status", name)
        if cuda:
            return control.expect(record, control.CudaShmStatus)
        return control.expect(record, control.ShmStatus)

    async def shm_register(self, cuda: bool, name: str, args: dict) -> None:
        """``args``: key, offset, byte_size (system) or raw_handle, device_id, byte_size,
        as the HTTP extension's JSON spells them. Raises INVALID_ARG naming the field
        when one has the wrong JSON type (``check_shm_register``)."""
        check_shm_register(cuda, args)
        body = orjson.dumps({**args, "name": name})
        await self.client.query("cuda_shm_register" if cuda else "shm_register", name, body=body)

    async def shm_unregister(self, cuda: bool, name: str = "") -> None:
        await self.client.query("cuda_shm_unregister" if cuda else "shm_unregister", name)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "a boolean"
    if type(value) is int:
        return "an integer"
    if type(value) is float:
        return "a number with a fraction or exponent"
    if type(value) is str:
        return "a string"
    return "an array" if type(value) is list else "an object"


def check_shm_register(cuda: bool, args: dict) -> None:
    """The types of a shared-memory registration's fields, as Triton's HTTP server
    reads them: ``key`` a string; ``offset``, ``byte_size`` and ``device_id``
    non-negative JSON integers (not true, not 63.9, not "64"); ``raw_handle`` an object
    with a ``b64`` string. Absent fields are the scheduler's to refuse (it names the
    ones a registration needs). Raises INVALID_ARG naming the field."""
    what = "CUDA shared memory" if cuda else "system shared memory"
    for field in ("byte_size", "device_id") if cuda else ("key", "offset", "byte_size"):
        if field not in args:
            continue
        value = args[field]
        if field == "key":
            if type(value) is not str:
                raise invalid_arg(
                    f"unable to parse 'key' of the {what} registration: it must be a string, "
                    f"got {_json_type(value)} ({value!r})"
                )
        elif type(value) is not int or value < 0:
            raise invalid_arg(
                f"unable to parse '{field}' of the {what} registration: it must be a "
                f"non-negative integer, got {_json_type(value)} ({value!r})"
            )
    if cuda and "raw_handle" in args:
        handle = args["raw_handle"]
        if type(handle) is not dict or type(handle.get("b64")) is not str:
            raise invalid_arg(
                f"unable to parse 'raw_handle' of the {what} registration: it must be an "
                'object {"b64": "<base64 of the cudaIpcMemHandle_t>"}'
            )
