"""Triton's ``triton_python_backend_utils`` (``pb_utils``) for models served by meshserve.

A user's Triton ``model.py`` does ``import triton_python_backend_utils as pb_utils``; the Python
runtime (services/python/runtime.py) makes that name resolve to this module before it imports the
model, then hands ``execute`` a list of :class:`InferenceRequest` and expects one
:class:`InferenceResponse` per request back. Names and signatures follow Triton's Python backend;
tensors live in the same process, so a :class:`Tensor` wraps its numpy array without copying.

BLS (``InferenceRequest(...).exec()`` / ``await ....async_exec()``) calls other models through
the mesh's gateway (services/python/bls.py; with ``decoupled=True``, an iterator of the called
model's responses: services/python/bls_stream.py). Decoupled models answer through
``request.get_response_sender()`` (clients use ModelStreamInfer). Not offered yet: GPU tensors
(every tensor is on the CPU).

Data types and model-config lookups (``TYPE_*``, ``triton_to_numpy_type``,
``get_input_config_by_name``, ...): services/python/_pb_utils_config.py, re-exported here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from services.python._pb_utils_config import TYPE_BF16 as TYPE_BF16
from services.python._pb_utils_config import TYPE_BOOL as TYPE_BOOL
from services.python._pb_utils_config import TYPE_FP16 as TYPE_FP16
from services.python._pb_utils_config import TYPE_FP32 as TYPE_FP32
from services.python._pb_utils_config import TYPE_FP64 as TYPE_FP64
from services.python._pb_utils_config import TYPE_INT8 as TYPE_INT8
from services.python._pb_utils_config import TYPE_INT16 as TYPE_INT16
from services.python._pb_utils_config import TYPE_INT32 as TYPE_INT32
from services.python._pb_utils_config import TYPE_INT64 as TYPE_INT64
from services.python._pb_utils_config import TYPE_INVALID as TYPE_INVALID
from services.python._pb_utils_config import TYPE_STRING as TYPE_STRING
from services.python._pb_utils_config import TYPE_UINT8 as TYPE_UINT8
from services.python._pb_utils_config import TYPE_UINT16 as TYPE_UINT16
from services.python._pb_utils_config import TYPE_UINT32 as TYPE_UINT32
from services.python._pb_utils_config import TYPE_UINT64 as TYPE_UINT64
from services.python._pb_utils_config import (
    get_input_config_by_name,
    get_output_config_by_name,
    numpy_to_triton_type,
    triton_string_to_numpy,
    triton_to_numpy_type,
    using_decoupled_model_transaction_policy,
)
from services.python.auto_complete import ModelConfig as ModelConfig
from services.python.custom_metrics import Metric, MetricFamily

if TYPE_CHECKING:
    from services.python.bls_stream import ResponseIterator

__all__ = [
    "TRITONSERVER_RESPONSE_COMPLETE_FINAL",
    "InferenceRequest",
    "InferenceResponse",
    "InferenceResponseSender",
    "Logger",
    "Metric",
    "MetricFamily",
    "ModelConfig",
    "Tensor",
    "TritonError",
    "TritonModelException",
    "get_input_config_by_name",
    "get_input_tensor_by_name",
    "get_output_config_by_name",
    "get_output_tensor_by_name",
    "is_model_ready",
    "load_model",
    "numpy_to_triton_type",
    "triton_string_to_numpy",
    "triton_to_numpy_type",
    "unload_model",
    "using_decoupled_model_transaction_policy",
]

NDArray = npt.NDArray[Any]

#: the flag of a decoupled model's last response to a request (``InferenceResponseSender.send``)
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 1, 2


class TritonModelException(Exception):
    """Raised by pb_utils calls that fail; a model may raise it too (the client sees its text)."""


class TritonError:
    """An error attached to one :class:`InferenceResponse`: fails that request only."""

    UNKNOWN: ClassVar[int] = 0
    INTERNAL: ClassVar[int] = 1
    NOT_FOUND: ClassVar[int] = 2
    INVALID_ARG: ClassVar[int] = 3
    UNAVAILABLE: ClassVar[int] = 4
    UNSUPPORTED: ClassVar[int] = 5
    ALREADY_EXISTS: ClassVar[int] = 6
    CANCELLED: ClassVar[int] = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = str(message)
        self._code = int(code)

    def message(self) -> str:
        """The text the client sees."""
        return self._message

    def code(self) -> int:
        """One of the class constants (INTERNAL when not given)."""
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class Tensor:
    """A named tensor backed by a numpy array (always on the CPU here)."""

    def __init__(self, name: str, tensor: NDArray) -> None:
        if not isinstance(tensor, np.ndarray):
            raise TritonModelException(
                f"pb_utils.Tensor '{name}' needs a numpy array, got {type(tensor).__name__}; "
                "wrap the value with numpy.asarray(...)"
            )
        self._name = name
        self._array = tensor

    def name(self) -> str:
        """The tensor's name (an input or output name of the model config)."""
        return self._name

    def as_numpy(self) -> NDArray:
        """The tensor as a numpy array (no copy); BYTES tensors are object arrays."""
        return self._array

    def is_cpu(self) -> bool:
        """Always True: this server keeps Python-model tensors in host memory."""
        return True

    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return tuple(int(d) for d in self._array.shape)

    def to_dlpack(self) -> Any:
        """A DLPack capsule of the tensor (not for BYTES tensors)."""
        if self._array.dtype == np.object_:
            raise TritonModelException(f"BYTES tensor '{self._name}' has no DLPack form")
        return self._array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        """A tensor from a DLPack capsule, or any CPU object implementing ``__dlpack__``."""
        source = capsule if hasattr(capsule, "__dlpack__") else _Capsule(capsule)
        return Tensor(name, np.from_dlpack(source))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={list(self._array.shape)}, dtype={self._array.dtype})"


class _Capsule:
    """Lets numpy read a bare DLPack capsule (numpy only takes objects with ``__dlpack__``)."""

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, **_: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU, device 0


class InferenceRequest:
    """One request as ``execute`` receives it (Triton's server-side request object)."""

    def __init__(
        self,
        model_name: str = "",
        inputs: Sequence[Tensor] = (),
        requested_output_names: Sequence[str] = (),
        request_id: str = "",
        correlation_id: int | str = 0,
        flags: int = 0,
        parameters: Mapping[str, Any] | str | None = None,
        model_version: int = -1,
        timeout: int = 0,
        preferred_memory: Any = None,
        trace: Any = None,
    ) -> None:
        self._model_name = model_name
        self._inputs = list(inputs)
        self._requested = list(requested_output_names)
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        if parameters is None:
            parameters = {}
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(parameters)
        self._model_version = model_version
        self._timeout = timeout
        del preferred_memory, trace  # accepted for Triton compatibility; tensors stay on the CPU
        #: set by the runtime for requests to a decoupled model
        self._sender: InferenceResponseSender | None = None

    def inputs(self) -> list[Tensor]:
        """Every input tensor of the request."""
        return list(self._inputs)

    def requested_output_names(self) -> list[str]:
        """The outputs the client asked for (every model output when it named none)."""
        return list(self._requested)

    def request_id(self) -> str:
        """The client's request id ("" when it gave none)."""
        return self._request_id

    def correlation_id(self) -> int | str:
        """The sequence correlation id (0: not part of a sequence)."""
        return self._correlation_id

    def flags(self) -> int:
        """Sequence flags: TRITONSERVER_REQUEST_FLAG_SEQUENCE_START / _END bits."""
        return self._flags

    def parameters(self) -> str:
        """The request's parameters as a JSON object string, as in Triton."""
        return self._parameters

    def model_name(self) -> str:
        """The name of the model this request is for."""
        return self._model_name

    def is_cancelled(self) -> bool:
        """Whether the client stopped waiting (observed for decoupled models' streams)."""
        return self._sender is not None and self._sender.is_cancelled()

    def get_response_sender(self) -> InferenceResponseSender:
        """Decoupled models: the sender of this request's responses."""
        if self._sender is None:
            raise TritonModelException(
                "get_response_sender() is for decoupled models: set "
                "model_transaction_policy { decoupled: true } in the config"
            )
        return self._sender

    def model_version(self) -> int:
        """The version a BLS call asks for (-1: the version the server picks)."""
        return self._model_version

    def timeout(self) -> int:
        """A BLS call's timeout in microseconds (0: the default)."""
        return self._timeout

    def exec(self, decoupled: bool = False) -> InferenceResponse | ResponseIterator:
        """BLS: run this request on ``model_name`` through the gateway, blocking until done;
        ``decoupled=True``: an iterator of the model's responses (needed for decoupled models).

        A failure does not raise: check ``has_error()`` on the response, as in Triton.
        """
        from services.python import bls, bls_stream

        return bls_stream.execute(self) if decoupled else bls.execute(self)

    async def async_exec(self, decoupled: bool = False) -> InferenceResponse | ResponseIterator:
        """BLS: as :meth:`exec`, awaitable (for ``async def execute``)."""
        from services.python import bls, bls_stream

        if decoupled:
            return await bls_stream.execute_async(self)
        return await bls.execute_async(self)


class InferenceResponseSender:
    """A decoupled model's way to answer one request: any number of ``send`` calls, from any
    thread, during or after ``execute``; the last one has
    ``flags=TRITONSERVER_RESPONSE_COMPLETE_FINAL`` (with a response, or alone)."""

    def __init__(
        self,
        deliver: Callable[[InferenceResponse | None, bool], None],
        cancelled: Callable[[], bool],
    ) -> None:
        self._deliver = deliver
        self._cancelled = cancelled

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        """Send ``response`` (None: only the flag); raises after the FINAL one was sent."""
        final = bool(flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if response is None and not final:
            raise TritonModelException("send() needs a response unless it carries the FINAL flag")
        self._deliver(response, final)

    def is_cancelled(self) -> bool:
        """Whether the client stopped waiting for this request's responses."""
        return self._cancelled()


class InferenceResponse:
    """What ``execute`` returns for one request: output tensors, or an error."""

    def __init__(
        self,
        output_tensors: Sequence[Tensor] = (),
        error: TritonError | None = None,
        parameters: Mapping[str, Any] | str | None = None,
    ) -> None:
        if error is not None and not isinstance(error, TritonError):
            raise TritonModelException(
                "InferenceResponse error must be a pb_utils.TritonError, got "
                f"{type(error).__name__}"
            )
        self._outputs = list(output_tensors)
        self._error = error
        if parameters is None:
            parameters = {}
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(parameters)

    def output_tensors(self) -> list[Tensor]:
        """The response's output tensors."""
        return list(self._outputs)

    def has_error(self) -> bool:
        """Whether the response carries an error."""
        return self._error is not None

    def error(self) -> TritonError | None:
        """The response's error, if any."""
        return self._error

    def parameters(self) -> str:
        """The response's parameters as a JSON object string."""
        return self._parameters


class Logger:
    """Triton's ``pb_utils.Logger``: messages go to the server's log."""

    _log: ClassVar[logging.Logger] = logging.getLogger("triton_python_backend_utils")

    @classmethod
    def log_info(cls, message: str) -> None:
        cls._log.info("%s", message)

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls._log.warning("%s", message)

    @classmethod
    def log_error(cls, message: str) -> None:
        cls._log.error("%s", message)

    @classmethod
    def log_verbose(cls, message: str) -> None:
        cls._log.debug("%s", message)


def _by_name(tensors: Sequence[Tensor], name: str) -> Tensor | None:
    for tensor in tensors:
        if tensor.name() == name:
            return tensor
    return None


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    """The request's input ``name``, or None when the request has no such input."""
    return _by_name(inference_request.inputs(), name)


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    """The response's output ``name``, or None."""
    return _by_name(inference_response.output_tensors(), name)


# ---- BLS model loading API (services/python/bls_control.py) ----------------------------------
def load_model(model_name: str, config: str = "", files: Mapping[str, bytes] | None = None) -> None:
    """Load ``model_name`` through the gateway; raises TritonModelException on failure."""
    from services.python import bls_control

    bls_control.load_model(model_name, config, files)


def unload_model(model_name: str, unload_dependents: bool = False) -> None:
    """Unload ``model_name`` through the gateway; raises TritonModelException on failure."""
    from services.python import bls_control

    bls_control.unload_model(model_name, unload_dependents)


def is_model_ready(model_name: str, model_version: str = "") -> bool:
    """Whether the mesh serves ``model_name`` (at ``model_version`` when given)."""
    from services.python import bls_control

    return bls_control.is_model_ready(model_name, model_version)
