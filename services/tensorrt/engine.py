"""What this family needs from a TensorRT engine, typed as Protocols, and its IO read from them.

TensorRT is imported only where an engine is deserialized (services/tensorrt/device.py); every
other module talks to the engine and its execution contexts through the Protocols below, so that
the code around the engine (dtype mapping, IO description, profiles, auto-complete) runs and is
tested without TensorRT. The Protocols name exactly the members of ``tensorrt.ICudaEngine`` and
``tensorrt.IExecutionContext`` (TensorRT >= 10, the name-based IO API) that this family calls.

Data types: TensorRT reports ``tensorrt.DataType`` members (``FLOAT``, ``HALF``, ...); they are
matched here by their ``name`` so the table needs no import. FP8, INT4 and FP4 IO have no Triton
datatype; an engine with such IO fails to load with a message naming the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError


class Named(Protocol):
    """A TensorRT enum member (``tensorrt.DataType.FLOAT``, ``tensorrt.TensorIOMode.INPUT``)."""

    @property
    def name(self) -> str: ...


class ExecutionContext(Protocol):
    """The members of ``tensorrt.IExecutionContext`` this family calls."""

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool: ...

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool: ...

    def get_tensor_shape(self, name: str) -> Iterable[int]: ...

    def set_tensor_address(self, name: str, memory: int) -> bool: ...

    def execute_async_v3(self, stream_handle: int) -> bool: ...


class Engine(Protocol):
    """The members of ``tensorrt.ICudaEngine`` this family calls."""

    @property
    def num_io_tensors(self) -> int: ...

    @property
    def num_optimization_profiles(self) -> int: ...

    def get_tensor_name(self, index: int) -> str: ...

    def get_tensor_mode(self, name: str) -> Named: ...

    def get_tensor_dtype(self, name: str) -> Named: ...

    def get_tensor_shape(self, name: str) -> Iterable[int]: ...

    def get_tensor_profile_shape(
        self, name: str, profile_index: int
    ) -> Sequence[Iterable[int]]: ...

    def create_execution_context(self) -> ExecutionContext | None: ...


#: ``tensorrt.DataType`` member name → config datatype
TRT_TO_CONFIG: dict[str, int] = {
    "FLOAT": mc.TYPE_FP32,
    "HALF": mc.TYPE_FP16,
    "BF16": mc.TYPE_BF16,
    "INT8": mc.TYPE_INT8,
    "UINT8": mc.TYPE_UINT8,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "BOOL": mc.TYPE_BOOL,
}
#: config datatype → ``tensorrt.DataType`` member name
CONFIG_TO_TRT: dict[int, str] = {v: k for k, v in TRT_TO_CONFIG.items()}

_SUPPORTED = ", ".join(TRT_TO_CONFIG)


def config_type(model: str, kind: str, name: str, trt_type: str) -> int:
    """The config datatype of a TensorRT IO datatype; ModelLoadError when it has none."""
    try:
        return TRT_TO_CONFIG[trt_type]
    except KeyError:
        raise ModelLoadError(
            f"model '{model}': {kind} '{name}' of the engine is {trt_type}, which has no Triton "
            f"datatype; rebuild the engine with IO in one of {_SUPPORTED} (cast inside the "
            "network)"
        ) from None


Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ProfileRange:
    """One input's allowed shapes under one optimization profile (min ≤ shape ≤ max)."""

    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True, slots=True)
class EngineTensor:
    """One IO tensor of the engine; implements services.core.autocomplete.ModelTensor."""

    name: str
    is_input: bool
    data_type: int
    #: engine shape, -1 where dynamic
    shape: Shape
    #: per optimization profile, in profile order (inputs only; empty for outputs)
    profiles: tuple[ProfileRange, ...] = ()

    @property
    def batchable(self) -> bool:
        """True when the first dimension is dynamic."""
        return bool(self.shape) and self.shape[0] == -1

    @property
    def rank(self) -> int | None:
        return len(self.shape)

    def dims(self, batching: bool) -> list[int]:
        return list(self.shape[1:] if batching else self.shape)


@dataclass(frozen=True, slots=True)
class EngineIO:
    """The engine's inputs and outputs, in engine order, and its number of profiles."""

    inputs: tuple[EngineTensor, ...]
    outputs: tuple[EngineTensor, ...]
    num_profiles: int

    def input(self, name: str) -> EngineTensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> EngineTensor | None:
        return next((t for t in self.outputs if t.name == name), None)


def _shape(dims: Iterable[int]) -> Shape:
    return tuple(int(d) for d in dims)


def read_io(model: str, engine: Engine) -> EngineIO:
    """Describe the engine's IO tensors by name (``num_io_tensors`` / ``get_tensor_*``)."""
    profiles = max(int(engine.num_optimization_profiles), 1)
    inputs: list[EngineTensor] = []
    outputs: list[EngineTensor] = []
    for index in range(int(engine.num_io_tensors)):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name).name == "INPUT"
        kind = "input" if is_input else "output"
        data_type = config_type(model, kind, name, engine.get_tensor_dtype(name).name)
        shape = _shape(engine.get_tensor_shape(name))
        if not is_input:
            outputs.append(EngineTensor(name, False, data_type, shape))
            continue
        ranges = []
        for profile in range(profiles):
            if -1 in shape:
                dims = engine.get_tensor_profile_shape(name, profile)
                low, opt, high = (_shape(d) for d in dims)
            else:  # a static input: every profile allows exactly its shape
                low = opt = high = shape
            ranges.append(ProfileRange(low, opt, high))
        inputs.append(EngineTensor(name, True, data_type, shape, tuple(ranges)))
    return EngineIO(tuple(inputs), tuple(outputs), profiles)
