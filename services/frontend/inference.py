"""The protocol-neutral inference request and result that both frontends speak.

The HTTP and gRPC adapters decode into these records and encode from them; the data
plane (``dataplane.py``) and the scheduler client know nothing of either protocol.
Tensor bytes are raw little-endian element bytes; BYTES tensors hold their
length-prefixed serialized form (``common.dtypes.serialize_bytes``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from despina.common.errors import invalid_arg

ParamValue = bool | int | float | str


@dataclass(slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    # Raw bytes (None when the tensor lives in a client shared-memory region named in
    # ``parameters``: shared_memory_region / _offset / _byte_size).
    data: bytes | memoryview | None
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(slots=True)
class OutputRequest:
    name: str
    binary: bool = False  # HTTP binary_data; ignored by gRPC (always raw)
    parameters: dict[str, ParamValue] = field(default_factory=dict)


class FrozenParams(dict):
    """A memo template's parameters: still a ``dict`` (msgspec, orjson and the codecs
    take it as one; ``dict(p)`` is a mutable copy), but every change raises TypeError, so
    no request rebuilt from a template can change the next one's."""

    __slots__ = ()

    def _refuse(self, *_args: object, **_kwargs: object) -> None:
        raise TypeError("a request memo's parameters are shared: copy them to change them")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]


class FrozenList(list):
    """A memo template's list (an input's shape, the outputs): still a ``list`` (equal to
    one, encoded as one; ``list(x)`` is a mutable copy), but every change raises
    TypeError."""

    __slots__ = ()

    def _refuse(self, *_args: object, **_kwargs: object) -> None:
        raise TypeError("a request memo's lists are shared: copy them to change them")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse  # type: ignore[assignment]
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse  # type: ignore[assignment]


class FrozenOutputRequest(OutputRequest):
    """A memo template's ``OutputRequest``: its fields cannot be set (``frozen_output``)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise TypeError("a request memo's outputs are shared: copy them to change them")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutputRequest):
            return NotImplemented
        return (self.name, self.binary, self.parameters) == (
            other.name,
            other.binary,
            other.parameters,
        )

    __hash__ = None  # type: ignore[assignment]


def frozen_output(output: OutputRequest) -> FrozenOutputRequest:
    """``output`` as a template's: its fields fixed, its parameters a ``FrozenParams``."""
    frozen = FrozenOutputRequest.__new__(FrozenOutputRequest)
    set_field = object.__setattr__
    set_field(frozen, "name", output.name)
    set_field(frozen, "binary", output.binary)
    set_field(frozen, "parameters", FrozenParams(output.parameters))
    return frozen


@dataclass(slots=True)
class InferenceRequest:
    model: str
    version: str  # "" lets the version policy choose
    id: str
    inputs: list[InputTensor]
    # Empty means "every output of the model", each encoded with ``binary_output``.
    outputs: list[OutputRequest]
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    binary_output: bool = False  # HTTP "binary_data_output" request parameter
    # Shared by the requests a ``RequestMemo`` rebuilt from one template: the
    # signatures (by id) they were found to fit, so the rest skip that check.
    checked: dict[int, object] | None = None


class RequestMemo:
    """The last request one client sent, as a template: a client sends the same metadata
    with every request of the same shapes (tritonclient, perf_analyzer), and a request
    whose bytes repeat it, tensor data aside, is rebuilt from this with its own data,
    without decoding or checking the metadata again; what the data plane checked
    against the model's signature stays checked (``InferenceRequest.checked``): ~35 µs
    of a c=1 request on 2 vCPUs. Each protocol's codec says what "the same" is
    (``key``: the body's leading bytes, ``marks``: bytes expected at offsets after it)
    and where each input's data lies (``remember``). Owned by one connection (HTTP and
    the lean gRPC transport; grpc.aio calls keep none); holds no request bytes, only
    where each input's data lies.

    The template is immutable: what ``rebuild`` shares between requests (shapes,
    parameters, the outputs) is ``FrozenList``, ``FrozenParams`` and ``FrozenOutputRequest``;
    each request gets its own inputs list. Only ``checked`` is shared on purpose: the
    data plane's record of what it checked for this template."""

    __slots__ = (
        "key",
        "total",
        "marks",
        "model",
        "version",
        "request_id",
        "inputs",
        "outputs",
        "params",
        "binary",
        "checked",
        "reply",
    )

    def __init__(self) -> None:
        self.key = b""
        self.total = -1  # the body's length; -1: nothing remembered
        self.marks: list[tuple[int, bytes]] = []
        self.model = self.version = self.request_id = ""
        # (name, datatype, shape, parameters, start of its data in the body or -1, end,
        # its data when not in the body: converted JSON or typed contents, or None)
        self.inputs: list[tuple] = []
        self.outputs: list[OutputRequest] = FrozenList()
        self.params: dict[str, ParamValue] = FrozenParams()
        self.binary = False
        self.checked: dict[int, object] = {}
        # The last response to this template, as its codec encoded it (for reuse)
        self.reply: tuple | None = None

    def matches(self, body: bytes) -> bool:
        if len(body) != self.total or not body.startswith(self.key):
            return False
        for offset, mark in self.marks:
            if not body.startswith(mark, offset):
                return False
        return True

    def remember(
        self,
        body: bytes,
        key_length: int,
        request: InferenceRequest,
        spans: list[tuple[int, int] | None],
        marks: list[tuple[int, bytes]] | None = None,
    ) -> None:
        """Remember ``request``, decoded from ``body``: ``spans`` gives, per input, where
        its data lies in the body (None: it is not the body's)."""
        self.inputs = [
            (t.name, t.datatype, FrozenList(t.shape), FrozenParams(t.parameters), -1, 0, t.data)
            if span is None
            else (
                t.name,
                t.datatype,
                FrozenList(t.shape),
                FrozenParams(t.parameters),
                span[0],
                span[1],
                None,
            )
            for t, span in zip(request.inputs, spans)
        ]
        self.key = body[:key_length]
        self.total = len(body)
        self.marks = marks or []
        self.model, self.version = request.model, request.version
        self.request_id = request.id
        self.outputs = FrozenList(frozen_output(o) for o in request.outputs)
        self.params = FrozenParams(request.parameters)
        self.binary = request.binary_output
        self.checked = {}
        self.reply = None
        # The template's own from now on: a reply cached for it (``reply``) is found by them
        request.outputs = self.outputs
        request.parameters = self.params
        request.checked = self.checked

    def forget(self) -> None:
        self.total = -1

    def rebuild(self, body: bytes, model: str, version: str) -> InferenceRequest:
        view = memoryview(body)
        request = InferenceRequest(
            model,
            version,
            self.request_id,
            [
                InputTensor(name, datatype, shape, data if start < 0 else view[start:end], p)
                for name, datatype, shape, p, start, end, data in self.inputs
            ],
            self.outputs,
            self.params,
            self.binary,
        )
        request.checked = self.checked
        return request


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    # None when the output was written into the client's shared-memory region.
    data: bytes | memoryview | None


@dataclass(slots=True)
class InferenceResult:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]
    # Output bytes may be views of a backend host's shared memory, lent to the call
    # (services/frontend/call.py): valid until the call closes.
    parameters: dict[str, ParamValue] = field(default_factory=dict)


_SEQUENCE_FLAGS = ("sequence_start", "sequence_end")
_UINT_REQUEST_PARAMS = ("priority", "timeout")


def check_request_parameter(
    key: str, value: ParamValue, show: Callable[[object], str], bool_spelling: str
) -> None:
    """Triton's checks on a request-level parameter, for both protocols: reserved
    ``triton_*`` keys, and the types of the sequence, priority and timeout parameters.
    ``show`` renders a value and ``bool_spelling`` names a boolean the way the caller's
    protocol writes them. Raises INVALID_ARG."""
    if key.startswith("triton_"):
        raise invalid_arg(
            f"parameter '{key}': keys starting with 'triton_' are reserved for Triton "
            "usage and should not be specified"
        )
    if key == "sequence_id":
        if not (type(value) is str or (type(value) is int and value >= 0)):
            raise invalid_arg(
                "unable to parse 'sequence_id': it must be a non-negative integer or a "
                f"string, got {show(value)}"
            )
    elif key in _SEQUENCE_FLAGS:
        if type(value) is not bool:
            raise invalid_arg(
                f"unable to parse '{key}': it must be {bool_spelling}, got {show(value)}"
            )
    elif key in _UINT_REQUEST_PARAMS:
        if type(value) is not int or value < 0:
            raise invalid_arg(
                f"unable to parse '{key}': it must be a non-negative integer, got {show(value)}"
            )


_SHM_UINT_PARAMS = ("shared_memory_offset", "shared_memory_byte_size")


def check_io_parameter(
    key: str,
    value: object,
    role: str,
    name: str,
    show: Callable[[object], str],
    string_spelling: str,
) -> None:
    """Triton's checks on a tensor's shared-memory parameters, for both protocols: the
    region a string, offset and byte size non-negative integers. ``role`` is "input" or
    "output"; ``show`` and ``string_spelling`` word the message as the protocol does.
    Raises INVALID_ARG."""
    if key == "shared_memory_region":
        if type(value) is not str:
            raise invalid_arg(
                f"unable to parse 'shared_memory_region' of {role} '{name}': it must be a "
                f"{string_spelling}, got {show(value)}"
            )
    elif key in _SHM_UINT_PARAMS:
        if type(value) is not int or value < 0:
            raise invalid_arg(
                f"unable to parse '{key}' of {role} '{name}': it must be a non-negative "
                f"integer, got {show(value)}"
            )


def outputs_key(result: InferenceResult) -> tuple:
    """What a result's outputs look like on the wire, but for their bytes: name, type,
    shape and byte size (-1: in the client's region). A codec reuses the encoding of the
    last response to a ``RequestMemo`` template while this stays the same."""
    return tuple(
        (
            o.name,
            o.datatype,
            tuple(o.shape),
            -1 if o.data is None else o.data.nbytes if type(o.data) is memoryview else len(o.data),
        )
        for o in result.outputs
    )


# Parameter names Triton keeps for itself (docs/protocol/extension_parameters.md), besides
# every ``triton_*`` name: a forwarded header must not set one of them.
_RESERVED_PARAMS = frozenset(
    (
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
        "binary_data_output",
    )
)


def compile_forward_pattern(pattern: str | None, option: str) -> re.Pattern[str] | None:
    """``--http-header-forward-pattern`` / ``--grpc-header-forward-pattern`` compiled once
    at start, as Triton reads it: a regular expression searched for anywhere in a header
    name (RE2's PartialMatch), case-insensitive unless it starts with ``(?-i)``. None when
    the option is empty (nothing is forwarded, and nothing is paid per request).

    Raises ValueError with the message to print when the expression does not compile
    (the server must not start: fail closed)."""
    if not pattern:
        return None
    flags = re.IGNORECASE
    body = pattern
    if body.startswith("(?-i)"):  # RE2's global switch; Python's re spells it per group
        flags, body = re.NOFLAG, body[5:]
    try:
        return re.compile(body, flags)
    except re.error as exc:
        raise ValueError(f"{option}: invalid regular expression {pattern!r}: {exc}") from None


def forward_headers(request: InferenceRequest, forwarded: dict[str, str]) -> None:
    """Add the headers a forward pattern matched (name in lower case -> value) to
    ``request``'s parameters as string values, as Triton does after reading the body's
    parameters: a header wins over a body parameter of the same name. The parameters dict
    is replaced, never changed in place (a ``RequestMemo`` shares it between requests).
    Raises INVALID_ARG for a name Triton reserves (``triton_*``, ``sequence_id``, ...)."""
    for key in forwarded:
        if key in _RESERVED_PARAMS or key.startswith("triton_"):
            raise invalid_arg(
                f"forwarded header '{key}': the parameter name is reserved for Triton "
                "usage and should not be specified"
            )
    request.parameters = {**request.parameters, **forwarded}
