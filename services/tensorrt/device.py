"""TensorRT and the GPU: the availability check, engine deserialization and device buffers.

The only module that imports ``tensorrt`` (lazily, inside functions) and the only one that
touches CUDA memory. Device buffers sit behind the small ``DeviceMemory`` Protocol; the
implementation used here, ``TorchCudaMemory``, allocates them as torch CUDA tensors (torch with
CUDA is the GPU stack the lent machines carry) and runs copies and the engine on one CUDA stream
per instance. Buffers are raw bytes (``torch.uint8``), so every datatype, BF16 included, travels
without conversion.

Without TensorRT, or without a CUDA GPU, ``service_problem`` returns ``NEEDS_MESSAGE`` (plus the
reason); ``__main__`` refuses to start with it and loading raises ModelLoadError with it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.core.errors import ModelLoadError
from services.core.requests import Array
from services.tensorrt.engine import Engine

logger = logging.getLogger(__name__)

NEEDS_MESSAGE = (
    "the TensorRT service needs NVIDIA TensorRT and a CUDA GPU; install the extra: "
    "pip install '.[tensorrt]' on a machine with a GPU"
)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module (ImportError when it is not installed)."""
    return importlib.import_module("tensorrt")


def cuda_device_count() -> int:
    """CUDA GPUs visible to torch; 0 when torch is missing or has no CUDA."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def service_problem(
    load_tensorrt: Callable[[], Any] = import_tensorrt,
    gpu_count: Callable[[], int] = cuda_device_count,
) -> str | None:
    """Why this machine cannot run TensorRT engines, or None when it can."""
    try:
        load_tensorrt()
    except ImportError as exc:
        return f"{NEEDS_MESSAGE} (tensorrt cannot be imported: {exc})"
    if gpu_count() < 1:
        return f"{NEEDS_MESSAGE} (no CUDA GPU found through torch.cuda)"
    return None


def require_service(model: str) -> Any:
    """The ``tensorrt`` module; ModelLoadError naming ``model`` when this machine lacks it."""
    problem = service_problem()
    if problem is not None:
        raise ModelLoadError(f"model '{model}': {problem}")
    return import_tensorrt()


def deserialize(model: str, path: Path) -> tuple[Engine, Any]:
    """Read a plan file with ``trt.Runtime(logger).deserialize_cuda_engine``.

    Returns the engine and the ``trt.Runtime`` that made it; keep both while the engine lives.
    """
    trt = require_service(model)
    if not path.is_file():
        raise ModelLoadError(
            f"model '{model}': plan file {path} does not exist or is not a file; put the engine "
            "in the version directory as model.plan or set default_model_filename"
        )
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine: Engine | None = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ModelLoadError(
            f"model '{model}': TensorRT could not deserialize {path}; a plan only loads with the "
            "TensorRT version and GPU kind that built it, so rebuild it here (trtexec "
            "--onnx=model.onnx --saveEngine=model.plan)"
        )
    return engine, runtime


class DeviceBuffer(Protocol):
    """One device allocation: its address for ``set_tensor_address``."""

    @property
    def address(self) -> int: ...


class DeviceMemory(Protocol):
    """Device buffers and the stream one instance runs on."""

    @property
    def stream_handle(self) -> int:
        """The CUDA stream (as an integer handle) for ``execute_async_v3``."""
        ...

    def upload(self, array: Array) -> DeviceBuffer:
        """A device copy of ``array`` (queued on the stream)."""
        ...

    def allocate(self, nbytes: int) -> DeviceBuffer:
        """An uninitialised device buffer of ``nbytes`` bytes."""
        ...

    def download(self, buffer: DeviceBuffer, dtype: np.dtype[Any], shape: Sequence[int]) -> Array:
        """The buffer's bytes as a host array; call after ``synchronize``."""
        ...

    def synchronize(self) -> None:
        """Wait for everything queued on the stream."""
        ...

    def activate(self) -> AbstractContextManager[object]:
        """Make this memory's GPU the calling thread's current CUDA device while in the block."""
        ...


class _TorchBuffer:
    """A torch CUDA uint8 tensor holding one tensor's bytes."""

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor

    @property
    def address(self) -> int:
        return int(self.tensor.data_ptr())


class TorchCudaMemory:
    """DeviceMemory on ``cuda:<device_id>`` through torch, with one stream of its own."""

    def __init__(self, device_id: int) -> None:
        import torch

        self._torch: Any = torch
        self._device = torch.device("cuda", max(device_id, 0))
        self._stream: Any = self._torch.cuda.Stream(device=self._device)

    @property
    def stream_handle(self) -> int:
        return int(self._stream.cuda_stream)

    def upload(self, array: Array) -> DeviceBuffer:
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        host = self._torch.from_numpy(raw.copy() if not raw.flags.writeable else raw)
        with self._torch.cuda.stream(self._stream):
            return _TorchBuffer(host.to(self._device, non_blocking=False))

    def allocate(self, nbytes: int) -> DeviceBuffer:
        with self._torch.cuda.stream(self._stream):
            # never a null pointer, even for empty tensors
            return _TorchBuffer(
                self._torch.empty(max(nbytes, 1), dtype=self._torch.uint8, device=self._device)
            )

    def download(self, buffer: DeviceBuffer, dtype: np.dtype[Any], shape: Sequence[int]) -> Array:
        if not isinstance(buffer, _TorchBuffer):
            raise TypeError("TorchCudaMemory.download takes buffers it allocated")
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        host: Array = buffer.tensor[:count].cpu().numpy()
        return host.view(dtype).reshape(tuple(shape))

    def synchronize(self) -> None:
        self._stream.synchronize()

    def activate(self) -> AbstractContextManager[object]:
        scope: AbstractContextManager[object] = self._torch.cuda.device(self._device)
        return scope
