"""The Python runtime: runs a user's Triton ``model.py`` (``class TritonPythonModel``) unchanged.

The model manager (services/core) creates one PythonRuntime per instance of a model version whose
config names ``backend: "python"``. Each instance imports ``<version>/model.py`` as a fresh module
(so instances share no module state), instantiates ``TritonPythonModel`` and calls
``initialize(args)`` with Triton's argument dict. The scheduler then calls, from one thread at a
time per instance:

- ``infer_requests(requests, outputs)`` with the batch's requests kept apart
  (``takes_request_list``): each becomes a ``pb_utils.InferenceRequest``, ``execute`` returns one
  ``InferenceResponse`` per request, and a response carrying a ``TritonError`` fails only its
  request;
- ``infer(inputs, outputs)`` with one concatenated batch, handed to ``execute`` as one request
  (what the kit calls when it does not ask for the request list).

``execute`` may be ``async def`` (as in Triton, to await BLS ``async_exec`` calls): it then runs
to completion on an event loop of its own in the calling worker thread.

Tensors are shared with the model without copying: numpy arrays in, numpy arrays out; BYTES are
object arrays of ``bytes`` both ways (``str`` elements in outputs are UTF-8 encoded).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import itertools
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes, tracing
from services.core.decoupled import ResponseStream, StreamClosed, StreamItem
from services.core.errors import (
    AlreadyExists,
    InternalError,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    ServingError,
    Unavailable,
    Unsupported,
)
from services.core.requests import Array, InferRequest
from services.core.runtime import InstanceSpec, Runtime
from services.core.sequences import SEQUENCE_END, SEQUENCE_ID, SEQUENCE_START
from services.python import auto_complete, bls
from services.python import triton_python_backend_utils as pb_utils
from services.python.auto_complete import model_config_json

logger = logging.getLogger(__name__)

#: the name user code imports the utils module by
UTILS_MODULE = "triton_python_backend_utils"

_module_ids = itertools.count()

_ERROR_BY_CODE: dict[int, type[ServingError]] = {
    pb_utils.TritonError.NOT_FOUND: NotFound,
    pb_utils.TritonError.INVALID_ARG: InvalidArgument,
    pb_utils.TritonError.UNAVAILABLE: Unavailable,
    pb_utils.TritonError.UNSUPPORTED: Unsupported,
    pb_utils.TritonError.ALREADY_EXISTS: AlreadyExists,
}

#: what execute's result becomes for one request: its outputs, or the error that fails it
RequestResult = dict[str, Array] | ServingError


def initialize_args(
    config: mc.ModelConfig, model_path: Path, instance: InstanceSpec
) -> dict[str, str]:
    """Triton's ``args`` for ``TritonPythonModel.initialize`` (every value a string)."""
    kind = "GPU" if instance.kind == mc.ModelInstanceGroup.KIND_GPU else "CPU"
    version_dir = model_path.parent
    return {
        "model_config": model_config_json(config),
        "model_instance_kind": kind,
        "model_instance_name": instance.name,
        "model_instance_device_id": str(max(instance.device_id, 0)),
        "model_repository": str(version_dir.parent),
        "model_version": version_dir.name,
        "model_name": config.name,
    }


def _import_model(model: str, path: Path) -> ModuleType:
    """Import ``model.py`` as a fresh module, with ``triton_python_backend_utils`` importable."""
    if not path.is_file():
        raise ModelLoadError(f"model '{model}': {path} does not exist; the Python backend needs it")
    sys.modules.setdefault(UTILS_MODULE, pb_utils)
    # Triton puts the version directory on sys.path so model.py can import its neighbours.
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    name = f"_meshserve_python_model_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"model '{model}': cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ModelLoadError(
            f"model '{model}': importing {path} raised {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("utf-8")


_as_bytes_all = np.frompyfunc(_as_bytes, 1, 1)


class PythonRuntime(Runtime):
    """Serves Triton Python-backend models (``model.py`` with ``class TritonPythonModel``)."""

    backend: ClassVar[str] = "python"
    platforms: ClassVar[tuple[str, ...]] = ()
    default_model_filename: ClassVar[str] = "model.py"
    #: the scheduler should call ``infer_requests`` with the batch's requests kept apart
    takes_request_list: ClassVar[bool] = True
    #: model.py sees the user's config, as in Triton; START / END / state come with requests
    declares_sequence_io: ClassVar[bool] = False

    @classmethod
    def autocomplete(cls, config: mc.ModelConfig, model_path: Path) -> None:
        """Let the model's ``auto_complete_config`` complete its config (auto_complete.py)."""
        module = _import_model(config.name, model_path)
        try:
            auto_complete.complete(config, getattr(module, "TritonPythonModel", None))
        finally:
            sys.modules.pop(module.__name__, None)

    def __init__(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> None:
        self.name = config.name
        self._batched = config.max_batch_size > 0
        self._output_types = {o.name: dtypes.from_config(o.data_type) for o in config.output}
        #: decoupled: execute answers through each request's response sender, returns None
        self._decoupled = config.model_transaction_policy.decoupled
        module = _import_model(self.name, model_path)
        self._module_name = module.__name__
        model_class = getattr(module, "TritonPythonModel", None)
        if not isinstance(model_class, type):
            sys.modules.pop(self._module_name, None)
            raise ModelLoadError(
                f"model '{self.name}': {model_path} defines no class TritonPythonModel; "
                "the Python backend instantiates that class"
            )
        try:
            model = model_class()
            initialize = getattr(model, "initialize", None)
            if initialize is not None:
                initialize(initialize_args(config, model_path, instance))
        except Exception as exc:
            sys.modules.pop(self._module_name, None)
            raise ModelLoadError(
                f"model '{self.name}': initialize raised {type(exc).__name__}: {exc}"
            ) from exc
        if not callable(getattr(model, "execute", None)):
            sys.modules.pop(self._module_name, None)
            raise ModelLoadError(
                f"model '{self.name}': TritonPythonModel in {model_path} has no execute(requests)"
            )
        self._model: Any = model
        if inspect.iscoroutinefunction(model.execute):
            self.runs_inline = False  # its own event loop cannot run on the service loop's thread
        logger.info(
            "loaded Python model '%s' instance %s from %s", self.name, instance.name, model_path
        )

    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        """Run one concatenated batch as a single request."""
        request = pb_utils.InferenceRequest(
            model_name=self.name,
            inputs=[pb_utils.Tensor(n, a) for n, a in inputs.items()],
            requested_output_names=list(outputs),
        )
        batch = _batch_size(inputs) if self._batched else None
        (result,) = self._execute([request], [batch])
        if isinstance(result, ServingError):
            raise result
        return result

    def infer_requests(
        self, requests: Sequence[InferRequest], outputs: Sequence[str]
    ) -> list[RequestResult]:
        """Run the batch's requests in one ``execute`` call; one result per request, in order."""
        pb_requests = [
            pb_utils.InferenceRequest(
                model_name=self.name,
                inputs=[pb_utils.Tensor(n, a) for n, a in r.inputs.items()],
                requested_output_names=[o.name for o in r.outputs] or list(outputs),
                request_id=r.id,
                correlation_id=_correlation_id(r),
                flags=_sequence_flags(r),
                parameters=dict(r.parameters),
            )
            for r in requests
        ]
        batches = [_batch_size(r.inputs) if self._batched else None for r in requests]
        if self._decoupled:
            for pb_request, request, batch in zip(pb_requests, requests, batches, strict=True):
                pb_request._sender = self._sender(pb_request, request.response_stream, batch)
        # execute runs in a worker thread, outside the requests' trace context: attach the first
        # one's, so BLS calls made by execute join its trace (and end by the requests' deadline)
        context = next((r.trace_context for r in requests if r.trace_context is not None), None)
        with tracing.attached(context), bls.executing_for(requests, self._calls_models):
            return self._execute(pb_requests, batches)

    def _calls_models(self) -> None:
        """A BLS call: from now on this model's batches never run on the event loop's thread,
        which a call back into this service (its answer served by that loop) would deadlock."""
        if self.runs_inline:
            self.runs_inline = False
            logger.info("model '%s' makes BLS calls: its batches run on worker threads", self.name)

    def _execute(
        self, requests: list[pb_utils.InferenceRequest], batches: list[int | None]
    ) -> list[RequestResult]:
        model = self._model
        if model is None:
            raise Unavailable(f"model '{self.name}' instance is unloaded")
        try:
            responses = model.execute(requests)
            if inspect.iscoroutine(responses):  # ``async def execute`` (awaits BLS async_exec)
                responses = asyncio.run(responses)
        except Exception as exc:
            logger.exception("model %r: execute raised", self.name)
            raise InternalError(
                f"model '{self.name}': execute raised {type(exc).__name__}: {exc}"
            ) from exc
        if self._decoupled:
            if responses is not None and (
                not isinstance(responses, list | tuple) or any(r is not None for r in responses)
            ):
                raise InternalError(
                    f"model '{self.name}' is decoupled: execute must return None and send each "
                    "response with request.get_response_sender().send(...)"
                )
            return [{} for _ in requests]
        if not isinstance(responses, list | tuple) or len(responses) != len(requests):
            count = (
                len(responses) if isinstance(responses, list | tuple) else type(responses).__name__
            )
            raise InternalError(
                f"model '{self.name}': execute must return a list of one InferenceResponse per "
                f"request ({len(requests)}), got {count}"
            )
        return [
            self._result(request, response, batch)
            for request, response, batch in zip(requests, responses, batches, strict=True)
        ]

    def _sender(
        self,
        request: pb_utils.InferenceRequest,
        stream: ResponseStream | None,
        batch: int | None,
    ) -> pb_utils.InferenceResponseSender:
        """The response sender of one request to a decoupled model, feeding its stream (a
        request without one, e.g. a warm-up, has its responses checked and dropped)."""

        def deliver(response: pb_utils.InferenceResponse | None, final: bool) -> None:
            outputs: dict[str, Array] | None = None
            error: ServingError | None = None
            if response is not None:
                result = self._result(request, response, batch)
                if isinstance(result, ServingError):
                    error = result
                else:
                    outputs = result
            if stream is None:
                return
            try:
                stream.send(StreamItem(outputs, error, final))
            except StreamClosed as exc:
                raise pb_utils.TritonModelException(
                    f"model '{self.name}': request '{request.request_id()}': {exc}"
                ) from None

        return pb_utils.InferenceResponseSender(
            deliver, lambda: stream is not None and stream.cancelled
        )

    def _result(
        self, request: pb_utils.InferenceRequest, response: object, batch: int | None
    ) -> RequestResult:
        """One response → its outputs (as the kit carries them) or the error failing it."""
        if not isinstance(response, pb_utils.InferenceResponse):
            return InternalError(
                f"model '{self.name}': execute returned {type(response).__name__} where a "
                "pb_utils.InferenceResponse belongs"
            )
        error = response.error()
        if error is not None:
            return _ERROR_BY_CODE.get(error.code(), InternalError)(error.message())
        produced = {t.name(): t.as_numpy() for t in response.output_tensors()}
        results: dict[str, Array] = {}
        try:
            for name in request.requested_output_names():
                if name not in produced:
                    raise InternalError(
                        f"model '{self.name}': the response has no output '{name}'; "
                        f"it holds {sorted(produced)}"
                    )
                results[name] = self._output(name, produced[name], batch)
        except ServingError as err:
            return err
        return results

    def _output(self, name: str, array: Array, batch: int | None) -> Array:
        """Check one output against the config and bring BYTES into the kit's form."""
        datatype = self._output_types.get(name)
        if datatype is None:
            raise InternalError(f"model '{self.name}': output '{name}' is not in the config")
        if datatype.name == "BYTES":
            array = np.asarray(_as_bytes_all(array), dtype=object).reshape(array.shape)
        elif array.dtype != datatype.numpy:
            raise InternalError(
                f"model '{self.name}': output '{name}' is {array.dtype} but the config declares "
                f"{mc.DataType.Name(datatype.config)}; cast it with .astype(np.{datatype.numpy})"
            )
        if batch is not None and (array.ndim == 0 or array.shape[0] != batch):
            raise InternalError(
                f"model '{self.name}': output '{name}' has shape {list(array.shape)}; expected "
                f"the request's batch dimension {batch} first"
            )
        return array

    def unload(self) -> None:
        model, self._model = self._model, None
        try:
            finalize = getattr(model, "finalize", None)
            if finalize is not None:
                finalize()
        except Exception:
            logger.exception("model %r: finalize raised", self.name)
        finally:
            sys.modules.pop(self._module_name, None)


def _batch_size(inputs: Mapping[str, Array]) -> int | None:
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else None
    return None


def _correlation_id(request: InferRequest) -> int | str:
    """The request's sequence_id parameter as ``correlation_id()`` gives it (0: none)."""
    value = request.parameters.get(SEQUENCE_ID, 0)
    return value if isinstance(value, int | str) and not isinstance(value, bool) else 0


def _sequence_flags(request: InferRequest) -> int:
    """``flags()``: the START and END bits of the request's sequence parameters."""
    params = request.parameters
    start = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START if params.get(SEQUENCE_START) else 0
    end = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END if params.get(SEQUENCE_END) else 0
    return start | end
