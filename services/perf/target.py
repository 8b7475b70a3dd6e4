"""What one run sends: the target's URL, the model's inputs resolved from its metadata and
config, the random request built and serialized once, the preflight that checks it, and
client system shared-memory regions for ``--protocol http-shm``. Run once per run, off the
hot path."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

try:
    import orjson
except ImportError:  # pragma: no cover - optional speed-up
    orjson = None  # type: ignore[assignment]


PROTOCOLS = ("http-json", "http-binary", "http-shm", "grpc", "grpc-stream")
PERCENTILES = (50, 90, 95, 99)

# Triton type -> numpy dtype used to generate data. BF16 travels as raw uint16 bits.
_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": np.uint16,
}


class LoadTestError(Exception):
    """A setup or protocol failure that ends the run; the message is for the user."""


# ---------------------------------------------------------------------------------------
# Setup: model metadata, input shapes, request bytes (run once, off the hot path)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise LoadTestError(f"only http:// URLs are supported, got {url!r}")
        return cls(parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.host_header}{self.base_path}{path}"


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


def fetch_json(target: Target, path: str, timeout: float = 10.0) -> dict:
    """GET a JSON document; raises LoadTestError with the server's body on failure."""
    try:
        with urllib.request.urlopen(target.url(path), timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:500]
        raise LoadTestError(f"GET {path}: HTTP {exc.code}: {body}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise LoadTestError(f"GET {target.url(path)}: {exc}") from None


def parse_shape_overrides(values: list[str]) -> tuple[dict[str, list[int]], int | None]:
    """``NAME:d1,d2`` (shape without the batch dimension, as perf_analyzer's --shape) or a
    bare ``N`` that replaces every variable (-1) dimension."""
    per_input: dict[str, list[int]] = {}
    default: int | None = None
    for value in values:
        name, sep, dims = value.rpartition(":")
        try:
            parsed = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise LoadTestError(f"bad --shape-override {value!r}") from None
        if any(d < 0 for d in parsed):
            raise LoadTestError(f"bad --shape-override {value!r}: negative dimension")
        if sep:
            per_input[name] = parsed
        elif len(parsed) == 1:
            default = parsed[0]
        else:
            raise LoadTestError(f"bad --shape-override {value!r}: use NAME:d1,d2 or N")
    return per_input, default


def resolve_inputs(
    metadata: dict,
    config: dict,
    overrides: dict[str, list[int]],
    default_dim: int | None,
    batch_size: int,
) -> list[InputSpec]:
    """Concrete input shapes. With ``max_batch_size > 0`` the metadata shape starts with the
    batch dimension (Triton reports it as -1); it becomes ``batch_size``, and the other -1
    dimensions become the override or 1. Config dims, when present, win over metadata."""
    max_batch = int(config.get("max_batch_size", 0) or 0)
    config_dims = {
        i["name"]: [int(d) for d in i.get("dims", [])]
        for i in config.get("input", [])
        if "name" in i and "dims" in i
    }
    specs = []
    for meta in metadata.get("inputs", []):
        name, datatype = meta["name"], meta["datatype"]
        if datatype != "BYTES" and datatype not in _NUMPY_TYPES:
            raise LoadTestError(f"input {name}: unsupported datatype {datatype}")
        if name in overrides:
            dims = list(overrides[name])
        elif name in config_dims:
            dims = config_dims[name]
        else:
            dims = [int(d) for d in meta["shape"]]
            if max_batch > 0 and dims:
                dims = dims[1:]
        dims = [d if d >= 0 else (default_dim if default_dim is not None else 1) for d in dims]
        shape = [batch_size, *dims] if max_batch > 0 else dims
        specs.append(InputSpec(name, datatype, tuple(shape)))
    if not specs:
        raise LoadTestError("model metadata lists no inputs")
    return specs


def random_tensor(rng: np.random.Generator, spec: InputSpec) -> np.ndarray:
    """Random data for one input: small non-negative integers (no overflow in add/sub
    style models), floats in [0, 1), random booleans, 8-character ASCII strings."""
    count = math.prod(spec.shape)
    if spec.datatype == "BYTES":
        letters = rng.integers(97, 123, size=(count, 8), dtype=np.uint8)
        return np.array([row.tobytes() for row in letters], dtype=np.object_).reshape(spec.shape)
    if spec.datatype == "BOOL":
        return rng.random(count).reshape(spec.shape) < 0.5
    if spec.datatype == "BF16":
        bits = rng.random(count, dtype=np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).reshape(spec.shape)
    dtype = np.dtype(_NUMPY_TYPES[spec.datatype])
    if dtype.kind == "f":
        return rng.random(count).astype(dtype).reshape(spec.shape)
    return rng.integers(0, 100, size=count).astype(dtype).reshape(spec.shape)


def _json_data(spec: InputSpec, array_: np.ndarray) -> list:
    flat = array_.ravel()
    if spec.datatype == "BYTES":
        return [b.decode() for b in flat]
    if spec.datatype == "BF16":
        return (flat.astype(np.uint32) << 16).view(np.float32).tolist()
    return flat.tolist()


def raw_bytes(spec: InputSpec, array_: np.ndarray) -> bytes:
    if spec.datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in array_.ravel())
    return np.ascontiguousarray(array_).tobytes()


def _dumps(obj: object) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":")).encode()


def build_body(
    protocol: str, inputs: list[InputSpec], output_names: list[str], seed: int
) -> tuple[bytes, dict[str, str]]:
    """The infer request body and its content headers, built once per run."""
    rng = np.random.default_rng(seed)
    tensors = [(spec, random_tensor(rng, spec)) for spec in inputs]
    if protocol == "http-json":
        doc = {
            "inputs": [
                {
                    "name": s.name,
                    "shape": list(s.shape),
                    "datatype": s.datatype,
                    "data": _json_data(s, a),
                }
                for s, a in tensors
            ]
        }
        return _dumps(doc), {"Content-Type": "application/json"}
    raws = [raw_bytes(s, a) for s, a in tensors]
    header_doc: dict[str, list[dict[str, object]]] = {
        "inputs": [
            {
                "name": s.name,
                "shape": list(s.shape),
                "datatype": s.datatype,
                "parameters": {"binary_data_size": len(raw)},
            }
            for (s, _), raw in zip(tensors, raws, strict=True)
        ],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in output_names],
    }
    header = _dumps(header_doc)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + b"".join(raws), headers


def infer_path(target: Target, model: str, version: str) -> str:
    suffix = f"/versions/{version}" if version else ""
    return f"{target.base_path}/v2/models/{model}{suffix}/infer"


def build_request(target: Target, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The whole HTTP/1.1 request, sent verbatim by every connection."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {target.host_header}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def content_length(data: bytes | bytearray, head_end: int) -> int:
    """Content-Length of a response whose header block ends at ``head_end`` (the index of
    ``\\r\\n\\r\\n``); -1 when absent (chunked responses are not supported)."""
    i = data.find(b"\r\nContent-Length:", 0, head_end)
    if i < 0:
        i = bytes(data[:head_end]).lower().find(b"\r\ncontent-length:")
        if i < 0:
            return -1
    j = data.find(b"\r\n", i + 17, head_end + 2)
    return int(data[i + 17 : j])


def describe_error(data: bytes | bytearray, need: int) -> str:
    """Status line and body of a complete error response, for the report."""
    response = bytes(data[:need])
    status = response[: response.find(b"\r\n")]
    body = response[response.find(b"\r\n\r\n") + 4 :]
    return (status + b": " + body[:1000]).decode(errors="replace")


def preflight(target: Target, request: bytes, timeout: float = 30.0) -> int:
    """Send the exact request bytes once; raises LoadTestError unless the answer is 200.
    Returns the response body size."""
    with socket.create_connection((target.host, target.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        need = -1
        while need < 0 or len(data) < need:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise LoadTestError("preflight: server closed the connection")
            data += chunk
            end = data.find(b"\r\n\r\n")
            if need < 0 and end >= 0:
                length = content_length(data, end)
                if length < 0:
                    raise LoadTestError("preflight: response has no Content-Length")
                need = end + 4 + length
    if not data.startswith(b"200", 9):
        raise LoadTestError(f"preflight: {describe_error(data, need)}")
    return need - end - 4


# ---------------------------------------------------------------------------------------
# System shared memory (--protocol http-shm): inputs and outputs in registered regions
# ---------------------------------------------------------------------------------------


def http_call(
    target: Target, method: str, path: str, body: bytes | None = None, headers=None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        target.url(path), data=body, method=method, headers=dict(headers or {})
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise LoadTestError(f"{method} {target.url(path)}: {exc}") from None


class ShmRegions:
    """One input region holding every input's bytes and one output region sized from a
    binary preflight, both in /dev/shm and registered with the server; ``close()``
    unregisters and unlinks them."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.names: list[str] = []

    def supported(self) -> bool:
        status, _, _ = http_call(self.target, "GET", "/v2/systemsharedmemory/status")
        return status == 200

    def create(self, suffix: str, data: bytes | int) -> str:
        name = f"perf_{os.getpid()}_{suffix}"
        size = data if isinstance(data, int) else len(data)
        fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, max(size, 1))
            if not isinstance(data, int):
                os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        self.names.append(name)
        doc = {"key": f"/{name}", "offset": 0, "byte_size": size}
        status, _, body = http_call(
            self.target,
            "POST",
            f"/v2/systemsharedmemory/region/{name}/register",
            _dumps(doc),
            {"Content-Type": "application/json"},
        )
        if status != 200:
            raise LoadTestError(f"register shared memory {name}: HTTP {status}: {body[:300]!r}")
        return name

    def close(self) -> None:
        for name in self.names:
            with contextlib.suppress(LoadTestError):
                http_call(self.target, "POST", f"/v2/systemsharedmemory/region/{name}/unregister")
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")
        self.names = []


def build_shm_body(
    target: Target,
    path: str,
    regions: ShmRegions,
    inputs: list[InputSpec],
    output_names: list[str],
    seed: int,
) -> tuple[bytes, dict[str, str]]:
    """A JSON request whose inputs and outputs all live in shared memory."""
    if not regions.supported():
        raise LoadTestError("the server has no system shared memory (/v2/systemsharedmemory)")
    binary, headers = build_body("http-binary", inputs, output_names, seed)
    status, rheaders, rbody = http_call(target, "POST", path, binary, headers)
    if status != 200:
        raise LoadTestError(f"binary preflight: HTTP {status}: {rbody[:300]!r}")
    hlen = {k.lower(): v for k, v in rheaders.items()}.get("inference-header-content-length")
    header = json.loads(rbody[: int(hlen)] if hlen else rbody)
    out_sizes = []
    for out in header.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            raise LoadTestError(f"output {out.get('name')}: no binary_data_size in the reply")
        out_sizes.append((out["name"], int(size)))
    rng = np.random.default_rng(seed)
    raws = [raw_bytes(s, random_tensor(rng, s)) for s in inputs]
    in_region = regions.create("in", b"".join(raws))
    out_region = regions.create("out", sum(size for _, size in out_sizes))
    doc_inputs, offset = [], 0
    for spec, raw in zip(inputs, raws, strict=True):
        doc_inputs.append(
            {
                "name": spec.name,
                "shape": list(spec.shape),
                "datatype": spec.datatype,
                "parameters": {
                    "shared_memory_region": in_region,
                    "shared_memory_offset": offset,
                    "shared_memory_byte_size": len(raw),
                },
            }
        )
        offset += len(raw)
    doc_outputs, offset = [], 0
    for name, size in out_sizes:
        doc_outputs.append(
            {
                "name": name,
                "parameters": {
                    "shared_memory_region": out_region,
                    "shared_memory_offset": offset,
                    "shared_memory_byte_size": size,
                },
            }
        )
        offset += size
    body = _dumps({"inputs": doc_inputs, "outputs": doc_outputs})
    return body, {"Content-Type": "application/json"}
