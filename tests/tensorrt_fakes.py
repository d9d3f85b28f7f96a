"""Fake TensorRT engine objects for the TensorRT family's tests (test_tensorrt_runtime.py):
FakeEngine, FakeContext and HostMemory (device buffers kept in host memory) implement the
Protocols of services/tensorrt/engine.py and device.py, since TensorRT cannot be installed here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Enum:
    """Stands for a TensorRT enum member (DataType.FLOAT, TensorIOMode.INPUT)."""

    name: str


@dataclass
class FakeTensor:
    mode: str
    dtype: str
    shape: tuple[int, ...]
    profiles: Sequence[tuple[tuple[int, ...], ...]] = ()


class FakeEngine:
    """Implements services.tensorrt.engine.Engine over a dict of tensors."""

    def __init__(self, tensors: dict[str, FakeTensor], memory: HostMemory | None = None) -> None:
        self.tensors = tensors
        self.memory = memory
        self.profile_calls: list[tuple[str, int]] = []
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return max([len(t.profiles) for t in self.tensors.values()] + [1])

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> Enum:
        return Enum(self.tensors[name].mode)

    def get_tensor_dtype(self, name: str) -> Enum:
        return Enum(self.tensors[name].dtype)

    def get_tensor_shape(self, name: str) -> Iterable[int]:
        return self.tensors[name].shape

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> Sequence[Iterable[int]]:
        self.profile_calls.append((name, profile_index))
        return self.tensors[name].profiles[profile_index]

    def create_execution_context(self) -> FakeContext:
        assert self.memory is not None
        self.contexts.append(FakeContext(self.memory))
        return self.contexts[-1]


class FakeContext:
    """Implements ExecutionContext: OUTPUT = INPUT * 2, reading and writing HostMemory buffers."""

    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self.calls: list[tuple[Any, ...]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        self.calls.append(("profile", profile_index, stream_handle))
        return True

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        self.calls.append(("shape", name, tuple(shape)))
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> Iterable[int]:
        return self.shapes["INPUT"] if name == "OUTPUT" else self.shapes[name]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.calls.append(("address", name))
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.calls.append(("execute", stream_handle))
        source = self.memory.buffers[self.addresses["INPUT"]].view(np.float32)
        self.memory.buffers[self.addresses["OUTPUT"]][:] = (source * 2).view(np.uint8)
        return True


@dataclass(frozen=True)
class HostBuffer:
    address: int  # implements services.tensorrt.device.DeviceBuffer


class HostMemory:
    """Implements DeviceMemory with 'device' buffers in host memory, addressed by a counter."""

    stream_handle = 7

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray[Any, np.dtype[np.uint8]]] = {}
        self.synchronized = 0

    def _add(self, data: np.ndarray[Any, np.dtype[np.uint8]]) -> HostBuffer:
        address = 0x1000 * (len(self.buffers) + 1)
        self.buffers[address] = data
        return HostBuffer(address)

    def upload(self, array: np.ndarray[Any, Any]) -> HostBuffer:
        return self._add(np.ascontiguousarray(array).reshape(-1).view(np.uint8).copy())

    def allocate(self, nbytes: int) -> HostBuffer:
        return self._add(np.zeros(nbytes, dtype=np.uint8))

    def download(self, buffer: Any, dtype: np.dtype[Any], shape: Sequence[int]) -> Any:
        return self.buffers[buffer.address].view(dtype).reshape(tuple(shape))

    def synchronize(self) -> None:
        self.synchronized += 1

    def activate(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


def dynamic_engine(memory: HostMemory | None = None) -> FakeEngine:
    """INPUT/OUTPUT FP32 [-1, 4]; profile 0 admits batch 1..8, profile 1 batch 9..32."""
    ranges = [((1, 4), (4, 4), (8, 4)), ((9, 4), (16, 4), (32, 4))]
    source = FakeTensor("INPUT", "FLOAT", (-1, 4), ranges)
    return FakeEngine({"INPUT": source, "OUTPUT": FakeTensor("OUTPUT", "FLOAT", (-1, 4))}, memory)


def static_engine() -> FakeEngine:
    tensors = {"x": FakeTensor("INPUT", "INT32", (2, 3)), "y": FakeTensor("OUTPUT", "HALF", (2, 3))}
    return FakeEngine(tensors)
