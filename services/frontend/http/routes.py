"""The one HTTP route table: which operation a method and path ask for, for every HTTP
transport (the lean one and aiohttp dispatch on ``match``'s answer).

Triton's routes (KServe v2 and its extensions), each ``{name}`` one non-empty path
segment, percent-decoded. A path that matches no route gets Triton's JSON 404, a route asked with another method its JSON
405 with ``Allow``. ``/v2/models/stats`` is every model's statistics (as in Triton), not
the metadata of a model named ``stats``.
"""

from __future__ import annotations

from urllib.parse import unquote

from despina.services.frontend.http import codec

# The operations. Handlers take the ``args`` of their ``Match``:
LIVE = "live"  # ()
READY = "ready"  # ()
SERVER_METADATA = "server_metadata"  # ()
MODEL_METADATA = "model_metadata"  # (model, version)
MODEL_READY = "model_ready"  # (model, version)
MODEL_CONFIG = "model_config"  # (model, version)
INFER = "infer"  # (model, version)
REPOSITORY_INDEX = "repository_index"  # ()
REPOSITORY_LOAD = "repository_load"  # (model)
REPOSITORY_UNLOAD = "repository_unload"  # (model)
SHM_STATUS = "shm_status"  # (cuda, region name or "")
SHM_REGISTER = "shm_register"  # (cuda, region name)
SHM_UNREGISTER = "shm_unregister"  # (cuda, region name or "": every region)
TRACE_SETTING = "trace_setting"  # (model or "": the global settings); GET reads, POST updates
LOGGING = "logging"  # (); GET reads, POST updates
STATISTICS = "statistics"  # (model or "": every model, version or "")
UNSUPPORTED = "unsupported"  # (message): an extension not built yet, Triton's 501
GENERATE = "generate"  # (model, version): the generate extension, one response
GENERATE_STREAM = "generate_stream"  # (model, version): its responses as Server-Sent Events

NOT_FOUND_BODY = codec.encode_error("Not Found")
NOT_ALLOWED_BODY = codec.encode_error("Method Not Allowed")


class Match:
    __slots__ = ("op", "args")

    def __init__(self, op: str, args: tuple) -> None:
        self.op = op
        self.args = args


class Miss:
    """No route: ``status`` 404, or 405 with the methods the route takes (``allow``)."""

    __slots__ = ("status", "body", "allow")

    def __init__(self, status: int, body: bytes, allow: str = "") -> None:
        self.status = status
        self.body = body
        self.allow = allow


NOT_FOUND = Miss(404, NOT_FOUND_BODY)
_SHM_ROOTS = {"systemsharedmemory": False, "cudasharedmemory": True}
_GET: tuple[str, ...] = ("GET",)
_POST: tuple[str, ...] = ("POST",)
_GET_POST: tuple[str, ...] = ("GET", "POST")


def _segment(raw: str) -> str:
    return unquote(raw) if "%" in raw else raw


def match(method: bytes | str, path: bytes | str) -> Match | Miss:
    """The operation ``method path`` asks for (``path`` without the query string, not
    percent-decoded), or the 404 / 405 to answer."""
    text = path.decode("utf-8", "replace") if isinstance(path, bytes) else path
    if isinstance(method, bytes):
        method = method.decode("latin-1")
    segments = text.split("/")
    if len(segments) < 2 or segments[0] or segments[1] != "v2":
        return NOT_FOUND
    methods = _GET
    found: Match | None = None
    match segments[2:]:
        case ["models", "stats"]:
            found = Match(STATISTICS, ("", ""))
        case ["trace", "setting"]:
            found, methods = Match(TRACE_SETTING, ("",)), _GET_POST
        case ["models", model, "trace", "setting"] if model:
            found, methods = Match(TRACE_SETTING, (_segment(model),)), _GET_POST
        case ["logging"]:
            found, methods = Match(LOGGING, ()), _GET_POST
        case ["models", model, *rest] if model:
            model = _segment(model)
            version = ""
            if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
                version = _segment(rest[1])
                rest = rest[2:]
            match rest:
                case []:
                    found = Match(MODEL_METADATA, (model, version))
                case ["ready"]:
                    found = Match(MODEL_READY, (model, version))
                case ["config"]:
                    found = Match(MODEL_CONFIG, (model, version))
                case ["infer"]:
                    found, methods = Match(INFER, (model, version)), _POST
                case ["generate"]:
                    found, methods = Match(GENERATE, (model, version)), _POST
                case ["generate_stream"]:
                    found, methods = Match(GENERATE_STREAM, (model, version)), _POST
                case ["stats"]:
                    found = Match(STATISTICS, (model, version))
        case ["health", "live"]:
            found = Match(LIVE, ())
        case ["health", "ready"]:
            found = Match(READY, ())
        case []:
            found = Match(SERVER_METADATA, ())
        case ["repository", "index"]:
            found, methods = Match(REPOSITORY_INDEX, ()), _POST
        case ["repository", "models", model, "load"] if model:
            found, methods = Match(REPOSITORY_LOAD, (_segment(model),)), _POST
        case ["repository", "models", model, "unload"] if model:
            found, methods = Match(REPOSITORY_UNLOAD, (_segment(model),)), _POST
        case [root, *rest] if root in _SHM_ROOTS:
            cuda = _SHM_ROOTS[root]
            match rest:
                case ["status"]:
                    found = Match(SHM_STATUS, (cuda, ""))
                case ["region", name, "status"] if name:
                    found = Match(SHM_STATUS, (cuda, _segment(name)))
                case ["region", name, "register"] if name:
                    found, methods = Match(SHM_REGISTER, (cuda, _segment(name))), _POST
                case ["region", name, "unregister"] if name:
                    found, methods = Match(SHM_UNREGISTER, (cuda, _segment(name))), _POST
                case ["unregister"]:
                    found, methods = Match(SHM_UNREGISTER, (cuda, "")), _POST
    if found is None:
        return NOT_FOUND
    if method not in methods:
        return Miss(405, NOT_ALLOWED_BODY, ", ".join(methods))
    return found
