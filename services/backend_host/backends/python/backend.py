"""The Python backend: runs a Triton-format ``model.py`` (class ``TritonPythonModel``)
unchanged, in the backend host's process.

``PythonBackend.load`` imports the model file as a fresh module, calls ``initialize(args)``
with Triton's argument dict, and returns a ``PythonModelInstance``. ``execute`` wraps each
``ExecRequest`` in a ``pb_utils.InferenceRequest`` (inputs are the host's arrays, not
copies), calls the model, checks what it returned the way Triton's stub does, and turns
each ``pb_utils.InferenceResponse`` into an ``ExecResponse``.

A model is imported as ``<package>.<file stem>`` where the package is a synthetic one
rooted at the version directory, so both the model's relative imports (``from . import
x``, Triton's ``<version>.model`` import) and plain sibling imports (the version and
model directories are appended to ``sys.path``, as Triton does) work. Despina runs one
Python model per process (the GIL: docs/architecture.md#services-and-what-runs-where), so
``sys.path`` entries and sibling modules are not isolated between two models loaded into
the same process.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import inspect
import itertools
import logging
import re
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson

from despina.common.errors import (
    DECOUPLED_UNARY,
    Code,
    ServerError,
    internal,
    invalid_arg,
    unsupported,
)
from despina.services.backend_host.backend import (
    DEFERRED,
    ExecRequest,
    ExecResponse,
    InstanceSpec,
    config_dict,
    config_json,
)
from despina.services.backend_host.backends.python import triton_python_backend_utils as pb_utils

_LOG = logging.getLogger(__name__)

UTILS_MODULE_NAME = "triton_python_backend_utils"

_ERROR_CODES: dict[int, Code] = {
    pb_utils.TritonError.UNKNOWN: Code.UNKNOWN,
    pb_utils.TritonError.INTERNAL: Code.INTERNAL,
    pb_utils.TritonError.NOT_FOUND: Code.NOT_FOUND,
    pb_utils.TritonError.INVALID_ARG: Code.INVALID_ARG,
    pb_utils.TritonError.UNAVAILABLE: Code.UNAVAILABLE,
    pb_utils.TritonError.UNSUPPORTED: Code.UNSUPPORTED,
    pb_utils.TritonError.ALREADY_EXISTS: Code.ALREADY_EXISTS,
    pb_utils.TritonError.CANCELLED: Code.CANCELLED,
}

_INSTANCE_KINDS = {"KIND_CPU": "CPU", "KIND_GPU": "GPU", "KIND_MODEL": "MODEL", "KIND_AUTO": "AUTO"}

# Request parameters that Triton turns into request fields (correlation id, flags,
# priority, timeout) instead of passing them to the model in ``parameters()``.
_RESERVED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output"}
)

_module_ids = itertools.count()


class PythonBackend:
    """The ``python`` backend. Stateless: every ``load`` makes an independent instance."""

    name = "python"

    def load(self, spec: InstanceSpec) -> PythonModelInstance:
        """Import the model, run ``initialize`` and return a working instance.

        Raises ServerError: INVALID_ARG when the model file or class is missing or
        malformed, INTERNAL when importing or initializing the model raised; the message carries the
        model's exception and traceback so the repository index can show it.
        """
        from despina.services.backend_host import warmup

        instance = PythonModelInstance(spec)
        try:
            warmup.run(instance, spec)  # model_warmup, before the instance says it is up
        except BaseException:
            instance.unload()
            raise
        return instance


def complete_config(config_json_text: bytes, model_dir: Path, version: str) -> bytes | None:
    """Triton's Python auto-complete: the config (Triton's JSON form) as the model's
    ``TritonPythonModel.auto_complete_config(auto_complete_model_config)`` staticmethod
    returns it, or None when the model has no such method. Imports ``model.py``: call it
    in a process that is thrown away afterwards (the launcher's forked child). Raises
    ServerError (INVALID_ARG naming the model) when the import or the method fails or
    returns something else than the ``pb_utils.ModelConfig`` it was given."""
    install_utils_module()
    config = orjson.loads(config_json_text)
    name = config.get("name", model_dir.name)
    path = model_dir / version / (config.get("default_model_filename") or "model.py")
    if not path.is_file():
        raise invalid_arg(f"Python model file not found in '{path}'")
    if b"auto_complete_config" not in path.read_bytes():
        return None  # nothing to call: spare the import (a model may import torch)
    for directory in (path.parent, model_dir):
        if str(directory) not in sys.path:
            sys.path.append(str(directory))
    try:
        module_spec = importlib.util.spec_from_file_location(
            f"_despina_autocomplete_{next(_module_ids)}", path
        )
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        raise invalid_arg(
            f"Failed to load Python model file '{path}' to auto-complete the config of "
            f"model '{name}': {describe_exception(exc)}"
        ) from None
    model_class = getattr(module, "TritonPythonModel", None)
    method = getattr(model_class, "auto_complete_config", None)
    if not callable(method):
        return None
    given = pb_utils.ModelConfig(config)
    try:
        returned = method(given)
    except (Exception, SystemExit) as exc:
        raise invalid_arg(
            f"auto_complete_config of model '{name}' failed: {describe_exception(exc)}"
        ) from None
    if not isinstance(returned, pb_utils.ModelConfig):
        raise invalid_arg(
            f"auto_complete_config of model '{name}' must return the pb_utils.ModelConfig it "
            f"was given, it returned {type(returned).__name__}"
        )
    return orjson.dumps(returned.as_dict())


class PythonModelInstance:
    """One ``TritonPythonModel`` object. Used by one thread at a time (the Backend
    protocol); a failed batch leaves it usable."""

    def __init__(self, spec: InstanceSpec) -> None:
        install_utils_module()
        # Triton's JSON form of the config: what ``initialize`` gets, read here too (a
        # Python instance process receives it so, and loads no protobuf).
        self._config_json = config_json(spec.config)
        config: dict[str, Any] = orjson.loads(self._config_json)
        self._spec = spec
        self._name = triton_instance_name(spec, config)
        self._outputs: tuple[str, ...] = tuple(o["name"] for o in config.get("output", ()))
        # Inputs and outputs with a ``reshape`` (only those): the model sees
        # ``reshape.shape`` and returns it; the client sends and gets ``dims``.
        self._batched = int(config.get("max_batch_size", 0)) > 0
        self._reshape_in = {
            i["name"]: tuple(int(d) for d in i["reshape"]["shape"])
            for i in config.get("input", ())
            if "reshape" in i
        }
        self._reshape_out = {
            o["name"]: tuple(int(d) for d in o["dims"])
            for o in config.get("output", ())
            if "reshape" in o
        }
        self._bf16_inputs = frozenset(
            i["name"] for i in config.get("input", ()) if i.get("data_type") == "TYPE_BF16"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._module_names: list[str] = []

        # A message field is in the JSON only when it is set (HasField). Decoupled: the
        # model answers through response senders (``_execute_decoupled``).
        self.decoupled = bool((config.get("model_transaction_policy") or {}).get("decoupled"))
        self._infers: dict[int, Any] = {}  # id(ExecRequest) -> its m.Infer (``accept``)
        self._post: Any = None  # (m.Infer, ExecResponse | None, final) -> the loop (``bind``)
        self._streaming: dict = {}

        filename = config.get("default_model_filename") or "model.py"
        path = spec.version_dir / filename
        if path.suffix != ".py":
            raise invalid_arg(
                f"Python model file name must end with '.py', model '{spec.model_name}' "
                f"names '{filename}'"
            )
        if not path.is_file():
            raise invalid_arg(f"Python model file not found in '{path}'")

        try:
            module = self._import(path)
        except (Exception, SystemExit) as exc:
            self._forget_modules()
            raise internal(
                f"Failed to load Python model file '{path}' for model instance "
                f"'{self._name}': {describe_exception(exc)}"
            ) from exc

        model_class = getattr(module, "TritonPythonModel", None)
        if not isinstance(model_class, type):
            self._forget_modules()
            raise invalid_arg(
                f"Python model file '{path}' does not define class 'TritonPythonModel'"
            )
        if not callable(getattr(model_class, "execute", None)):
            self._forget_modules()
            raise invalid_arg(f"Python model {path} does not implement `execute` method.")
        # auto_complete_config ran before the instances were started (launcher.py).

        try:
            self._model = model_class()
            initialize = getattr(self._model, "initialize", None)
            if initialize is not None:
                self._resolve(initialize(self._initialize_args()))
        except (Exception, SystemExit) as exc:
            self._stop_loop()
            self._forget_modules()
            raise internal(
                f"Failed to initialize Python model instance '{self._name}': "
                f"{describe_exception(exc)}"
            ) from exc

    # -- loading ---------------------------------------------------------------------

    def _import(self, path: Path) -> ModuleType:
        for directory in (path.parent, self._spec.model_dir):
            entry = str(directory)
            if entry not in sys.path:
                sys.path.append(entry)

        safe = re.sub(r"\W", "_", f"{self._spec.model_name}_{self._spec.version}")
        package_name = (
            f"_despina_python_model_{safe}_{self._spec.instance_index}_{next(_module_ids)}"
        )
        package_spec = importlib.machinery.ModuleSpec(package_name, None, is_package=True)
        package_spec.submodule_search_locations = [str(path.parent)]
        package = importlib.util.module_from_spec(package_spec)
        sys.modules[package_name] = package
        self._module_names.append(package_name)

        module_name = f"{package_name}.{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot import '{path}'")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        self._module_names.append(module_name)
        module_spec.loader.exec_module(module)
        # As an import statement leaves it: the module is an attribute of its package, so
        # ``__import__(__name__)`` walked down by name (``unittest.main(__name__)``) finds it.
        setattr(package, path.stem, module)
        return module

    def _initialize_args(self) -> dict[str, str]:
        spec = self._spec
        return {
            # Triton's JSON: proto field names, defaults printed, 64-bit ints as numbers.
            "model_config": self._config_json.decode(),
            "model_instance_kind": _INSTANCE_KINDS.get(spec.kind, spec.kind.removeprefix("KIND_")),
            "model_instance_name": self._name,
            "model_instance_device_id": str(spec.device_id),
            "model_repository": str(spec.model_dir),
            "model_version": str(spec.version),
            "model_name": spec.model_name,
        }

    def _forget_modules(self) -> None:
        """Drop this instance's modules, and the sibling modules imported from its model
        directory, from ``sys.modules`` so a later load imports fresh files."""
        for name in self._module_names:
            sys.modules.pop(name, None)
        self._module_names.clear()
        model_dir = str(self._spec.model_dir.resolve())
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file and str(Path(file).resolve()).startswith(model_dir + "/"):
                sys.modules.pop(name, None)

    # -- execution -------------------------------------------------------------------

    def execute(self, requests: list[ExecRequest]) -> list[ExecResponse]:
        """Run one batch through the model's ``execute``.

        Returns one ExecResponse per request, in order; a ``pb_utils.TritonError`` in a
        response becomes that request's ``ServerError`` with the mapped code. Raises
        ServerError(INTERNAL) when the model raised or returned something other than one
        InferenceResponse per request: every request of the batch fails, the instance
        stays usable.
        """
        if self.decoupled:
            return self._execute_decoupled(requests)
        if self._reshape_in:
            requests = [
                ExecRequest(
                    r.request_id,
                    self._reshape(r.inputs, self._reshape_in),
                    r.requested_outputs,
                    r.parameters,
                )
                for r in requests
            ]
        pb_requests = [self._wrap(r) for r in requests]
        try:
            result = self._model.execute(pb_requests)
            if type(result) is not list and inspect.isawaitable(result):
                result = self._resolve(result)
        except (Exception, SystemExit) as exc:
            raise self._batch_error(requests, describe_exception(exc)) from exc

        if not isinstance(result, list):
            raise self._batch_error(
                requests, f"Expected a list in the execute return, found type '{type(result)}'."
            )
        if len(result) != len(requests):
            raise self._batch_error(
                requests,
                "Number of InferenceResponse objects do not match the number of "
                f"InferenceRequest objects. InferenceRequest(s) size is:{len(requests)}, "
                f"and InferenceResponse(s) size is:{len(result)}\n",
            )
        # Converting has no side effects, so checking each element as it is converted is
        # the same as Triton's check-all-then-send.
        responses = []
        for req, resp in zip(requests, result, strict=True):
            if resp is not None and not isinstance(resp, pb_utils.InferenceResponse):
                raise self._batch_error(
                    requests,
                    "Expected an 'InferenceResponse' object in the execute function return "
                    f"list, found type '{type(resp)}'.",
                )
            responses.append(self._convert(req, resp))
        if self._reshape_out:
            for response in responses:
                if response.error is None:
                    response.outputs = self._reshape(response.outputs, self._reshape_out)
        return responses

    # -- decoupled mode ----------------------------------------------------------------

    def bind(self, replies: Any) -> None:
        """Where response senders send (the host's ``Replies``, on the loop this is called
        on): each ``send`` is handed to the loop, in order, from any thread."""
        loop = asyncio.get_running_loop()
        self._streaming = replies.streaming
        send_part = replies.send_part
        self._post = lambda infer, response, final: loop.call_soon_threadsafe(
            send_part, infer, response, final
        )

    def accept(self, infers: list, requests: list) -> None:
        """The executor's wire records of an execution's requests, before it runs (a
        sender needs its request's rid, reply address and outputs)."""
        for infer, request in zip(infers, requests, strict=True):
            if type(request) is ExecRequest:
                self._infers[id(request)] = infer

    def _execute_decoupled(self, requests: list[ExecRequest]) -> list[ExecResponse]:
        """Run one batch of a decoupled model: each request gets a response sender and
        is answered ``DEFERRED`` (its responses go through the sender); ``execute``
        must return None. A request that is not on a stream is refused, as Triton
        refuses ModelInfer and HTTP for a decoupled model. Raises ServerError(INTERNAL)
        as ``execute``; responses sent before that stay sent."""
        out: list[ExecResponse] = []
        pb_requests = []
        infers = self._infers
        for request in requests:
            infer = infers.pop(id(request), None)
            if infer is None or not infer.stream:
                out.append(ExecResponse(error=unsupported(DECOUPLED_UNARY)))
                continue
            if self._reshape_in:
                request = ExecRequest(
                    request.request_id,
                    self._reshape(request.inputs, self._reshape_in),
                    request.requested_outputs,
                    request.parameters,
                )
            pb_request = self._wrap(request)
            sender = pb_utils.InferenceResponseSender._for(self, request, infer)
            pb_request._sender = sender
            self._streaming[(infer.reply_to, infer.rid)] = sender
            pb_requests.append(pb_request)
            out.append(DEFERRED)
        if not pb_requests:
            return out
        try:
            result = self._model.execute(pb_requests)
            if inspect.isawaitable(result):
                result = self._resolve(result)
        except (Exception, SystemExit) as exc:
            raise self._batch_error(requests, describe_exception(exc)) from exc
        if result is not None:
            raise self._batch_error(
                requests,
                f"Python model '{self._name}' is using the decoupled mode and the execute "
                "function must return None.",
            )
        return out

    def _send(self, request: ExecRequest, infer: Any, response: Any, final: bool) -> None:
        """A sender's ``send``: convert (on the sender's thread) and hand to the loop."""
        converted = None
        if response is not None:
            converted = self._convert(request, response)
            if self._reshape_out and converted.error is None:
                converted.outputs = self._reshape(converted.outputs, self._reshape_out)
        self._post(infer, converted, final)

    def _reshape(self, arrays: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict:
        out = dict(arrays)
        for name, shape in shapes.items():
            array = out.get(name)
            if array is not None:
                array = np.asarray(array)
                out[name] = array.reshape((array.shape[0], *shape) if self._batched else shape)
        return out

    def _wrap(self, request: ExecRequest) -> pb_utils.InferenceRequest:
        bf16 = self._bf16_inputs
        wrap = pb_utils.Tensor._wrap
        if bf16:
            inputs = [
                wrap(name, array, pb_utils.TYPE_BF16 if name in bf16 else 0)
                for name, array in request.inputs.items()
            ]
        else:
            inputs = [wrap(name, array) for name, array in request.inputs.items()]
        parameters = request.parameters
        correlation_id: int | str = 0
        flags = 0
        timeout = 0
        if parameters and not _RESERVED_PARAMETERS.isdisjoint(parameters):
            sequence_id = parameters.get("sequence_id", 0)
            correlation_id = sequence_id if isinstance(sequence_id, (int, str)) else 0
            if parameters.get("sequence_start"):
                flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
            if parameters.get("sequence_end"):
                flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
            raw_timeout = parameters.get("timeout", 0)
            timeout = raw_timeout if isinstance(raw_timeout, int) else 0
            parameters = {k: v for k, v in parameters.items() if k not in _RESERVED_PARAMETERS}
        return pb_utils.InferenceRequest._from_backend(
            request.request_id,
            inputs,
            request.requested_outputs,
            self._outputs,
            parameters,
            correlation_id,
            flags,
            timeout,
        )

    def _convert(
        self, request: ExecRequest, response: pb_utils.InferenceResponse | None
    ) -> ExecResponse:
        if response is None:
            return ExecResponse(
                error=internal(
                    f"Python model instance '{self._name}' returned None for a request; "
                    "sending responses through a response sender is not supported by "
                    "Despina yet"
                )
            )
        # Hot path: read the response's slots directly (same package).
        error = response._error
        if error is not None:
            return ExecResponse(
                error=ServerError(_ERROR_CODES.get(error.code(), Code.INTERNAL), error.message())
            )
        # Triton keeps only the requested outputs; a request naming none asked for every
        # output in the config (and for everything when the config lists none).
        wanted: Sequence[str] = request.requested_outputs or self._outputs
        outputs = {}
        for tensor in response._output_tensors:
            if not isinstance(tensor, pb_utils.Tensor):
                return ExecResponse(
                    error=internal(
                        f"Python model instance '{self._name}' returned an output that is not "
                        f"a pb_utils.Tensor: {type(tensor)}"
                    )
                )
            name = tensor._name
            if wanted and name not in wanted:
                continue
            outputs[name] = tensor._array
        return ExecResponse(outputs)

    def _batch_error(self, requests: list[ExecRequest], message: str) -> ServerError:
        text = (
            f"Failed to process the request(s) for model instance '{self._name}', "
            f"message: {message}"
        )
        _LOG.warning("%s (request ids: %s)", text, [r.request_id for r in requests])
        return internal(text)

    # -- coroutines ------------------------------------------------------------------

    def _resolve(self, result: Any) -> Any:
        """Await ``result`` if the model's method was ``async def``. The coroutine runs
        on this instance's own event loop thread, so it works whether or not the caller
        is inside an event loop (Triton's stub does the same)."""
        if not inspect.isawaitable(result):
            return result
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(
                target=self._loop.run_forever, name=f"python-model-{self._name}", daemon=True
            )
            self._loop_thread.start()

        async def _await() -> Any:
            return await result

        return asyncio.run_coroutine_threadsafe(_await(), self._loop).result()

    def _stop_loop(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=5)
        self._loop.close()
        self._loop = None
        self._loop_thread = None

    # -- unloading -------------------------------------------------------------------

    def unload(self) -> None:
        """Call the model's ``finalize`` if it has one. An exception there is logged,
        not raised (Triton does the same): the instance is gone either way."""
        finalize = getattr(self._model, "finalize", None)
        try:
            if finalize is not None:
                self._resolve(finalize())
        except (Exception, SystemExit) as exc:
            _LOG.error(
                "finalize of Python model instance '%s' raised: %s",
                self._name,
                describe_exception(exc),
            )
        finally:
            self._stop_loop()
            self._forget_modules()


# ---------------------------------------------------------------------------------------
# Helpers


def install_utils_module() -> None:
    """Make ``import triton_python_backend_utils`` give Despina's implementation, even
    when a model folder ships Triton's own copy of the file (old examples did): the
    backend checks responses against these classes."""
    sys.modules[UTILS_MODULE_NAME] = pb_utils


def triton_instance_name(spec: InstanceSpec, config: dict[str, Any] | None = None) -> str:
    """Triton's name for an instance: ``<group name>_<index in group>`` (Triton 2.51), so
    ``add_sub_0_0`` for the first instance of a lone group Triton named ``add_sub_0``.

    ``spec.instance_index`` counts instances over the groups in config order, ``count``
    per group (the numbering of ``executor.instance_specs``). Without a matching group the
    name is ``<model>_0_<instance_index>``. ``config`` is the config as a dict of its
    JSON form, when the caller has it already.
    """
    if config is None:
        config = config_dict(spec.config)
    start = 0
    for group_index, group in enumerate(config.get("instance_group", ())):
        count = max(group.get("count", 0), 1)
        if spec.instance_index < start + count:
            group_name = group.get("name") or f"{spec.model_name}_{group_index}"
            return f"{group_name}_{spec.instance_index - start}"
        start += count
    return f"{spec.model_name}_0_{spec.instance_index}"


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` then the model's frames, innermost first, in the layout of
    Triton's stub errors (``\\n\\nAt:\\n  file(line): function``). Frames of this module
    and of importlib are left out: they say nothing about the model."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if frame.filename != __file__ and not frame.filename.startswith("<frozen ")
    ]
    text = f"{type(exc).__name__}: {exc}"
    if frames:
        text += "\n\nAt:\n" + "".join(
            f"  {frame.filename}({frame.lineno}): {frame.name}\n" for frame in reversed(frames)
        )
    return text
