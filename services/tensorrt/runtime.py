"""The TensorRT runtime: one deserialized engine and one execution context per model instance.

The model manager (services/core) creates one TensorrtRuntime per instance of a model version
whose config names platform "tensorrt_plan" or backend "tensorrt"; the scheduler calls ``infer``
with whole batches from a worker thread.

Loading (``__init__``): ``trt.Runtime(logger).deserialize_cuda_engine(plan bytes)`` on the
instance's GPU (services/tensorrt/device.py), the engine's IO read by name and checked against the
config (services/tensorrt/autocomplete.py), the instance's optimization profiles taken from its
group's ``profile`` strings (services/tensorrt/profiles.py), one ``IExecutionContext`` created.

Per batch (``infer``): choose the first of the instance's profiles that admits every input shape
(InvalidArgument naming the tensor and the allowed range when none does), ``set_input_shape`` for
each input, copy inputs to device buffers, allocate outputs at the shapes the context infers,
``set_tensor_address`` for every IO tensor, ``execute_async_v3`` on the instance's stream,
synchronize, copy the requested outputs back.

Only KIND_GPU instances are accepted. Outputs whose shape depends on the data (TensorRT reports
-1 after every input shape is set) would need an ``IOutputAllocator`` and are refused at run time.
The code that calls TensorRT has not been run on a GPU in this workplace (see the README).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from protos.gen.inference import model_config_pb2 as mc
from services.core.dtypes import numpy_from_config
from services.core.errors import InternalError, InvalidArgument, ModelLoadError, Unavailable
from services.core.requests import Array
from services.core.runtime import InstanceSpec, Runtime
from services.tensorrt.autocomplete import check_config, complete_config
from services.tensorrt.device import (
    DeviceBuffer,
    DeviceMemory,
    TorchCudaMemory,
    deserialize,
    require_service,
)
from services.tensorrt.engine import Engine, EngineIO, ExecutionContext, read_io
from services.tensorrt.profiles import choose_profile, instance_profiles

logger = logging.getLogger(__name__)


class TensorrtRuntime(Runtime):
    """Serves TensorRT plans (``model.plan``) on a CUDA GPU."""

    backend: ClassVar[str] = "tensorrt"
    platforms: ClassVar[tuple[str, ...]] = ("tensorrt_plan",)
    default_model_filename: ClassVar[str] = "model.plan"

    @classmethod
    def autocomplete(cls, config: mc.ModelConfig, model_path: Path) -> None:
        """Fill inputs, outputs and max_batch_size from the engine (needs TensorRT and a GPU)."""
        name = config.name or model_path.parent.parent.name
        engine, _runtime = deserialize(name, model_path)
        complete_config(config, read_io(name, engine))

    def __init__(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> None:
        require_service(config.name)
        _require_gpu_instance(config.name, instance)
        memory = TorchCudaMemory(instance.device_id)
        with memory.activate():
            engine, trt_runtime = deserialize(config.name, model_path)
            self._bind(config, engine, instance, memory)
        self._trt_runtime: Any = trt_runtime
        logger.info(
            "loaded model '%s' instance %s from %s on cuda:%d (profiles %s)",
            self.name,
            instance.name,
            model_path,
            max(instance.device_id, 0),
            list(self.profiles),
        )

    @classmethod
    def from_engine(
        cls,
        config: mc.ModelConfig,
        engine: Engine,
        instance: InstanceSpec,
        memory: DeviceMemory,
    ) -> TensorrtRuntime:
        """An instance over an engine already deserialized (and device memory already chosen)."""
        runtime = cls.__new__(cls)
        runtime._trt_runtime = None
        with memory.activate():
            runtime._bind(config, engine, instance, memory)
        return runtime

    def _bind(
        self,
        config: mc.ModelConfig,
        engine: Engine,
        instance: InstanceSpec,
        memory: DeviceMemory,
    ) -> None:
        self.name = config.name
        self.io: EngineIO = read_io(config.name, engine)
        check_config(config, self.io)
        self.profiles: tuple[int, ...] = instance_profiles(config, instance, self.io.num_profiles)
        context = engine.create_execution_context()
        if context is None:
            raise ModelLoadError(
                f"model '{self.name}': TensorRT could not create an execution context (out of "
                "GPU memory?); lower instance_group count or free the GPU"
            )
        self._engine: Engine | None = engine
        self._context: ExecutionContext | None = context
        self._memory = memory
        self._output_types = {t.name: numpy_from_config(t.data_type) for t in self.io.outputs}
        self._input_types = {t.name: numpy_from_config(t.data_type) for t in self.io.inputs}
        self.active_profile = self.profiles[0]
        self._select(context, self.active_profile)

    def _select(self, context: ExecutionContext, profile: int) -> None:
        if not context.set_optimization_profile_async(profile, self._memory.stream_handle):
            raise InternalError(
                f"model '{self.name}': TensorRT refused optimization profile {profile}"
            )
        self._memory.synchronize()
        self.active_profile = profile

    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        context = self._context
        if context is None:
            raise Unavailable(f"model '{self.name}' instance is unloaded")
        missing = [t.name for t in self.io.inputs if t.name not in inputs]
        if missing:
            raise InvalidArgument(f"model '{self.name}' needs input(s) {missing}; send them")
        shapes = {name: tuple(int(d) for d in array.shape) for name, array in inputs.items()}
        profile = choose_profile(self.io, self.profiles, shapes)
        with self._memory.activate():
            if profile != self.active_profile:
                self._select(context, profile)
            keep = self._bind_inputs(context, inputs)
            buffers = self._bind_outputs(context)
            if not context.execute_async_v3(self._memory.stream_handle):
                raise InternalError(f"model '{self.name}': TensorRT failed to run the engine")
            self._memory.synchronize()
            del keep
            names = list(outputs) if outputs else [t.name for t in self.io.outputs]
            result: dict[str, Array] = {}
            for name in names:
                if name not in buffers:
                    raise InternalError(f"model '{self.name}': output '{name}' is not an output")
                buffer, shape = buffers[name]
                result[name] = self._memory.download(buffer, self._output_types[name], shape)
            return result

    def _bind_inputs(
        self, context: ExecutionContext, inputs: Mapping[str, Array]
    ) -> list[DeviceBuffer]:
        keep: list[DeviceBuffer] = []
        for tensor in self.io.inputs:
            array = np.ascontiguousarray(inputs[tensor.name], dtype=self._input_types[tensor.name])
            if not context.set_input_shape(tensor.name, tuple(array.shape)):
                raise InvalidArgument(
                    f"model '{self.name}': TensorRT rejected shape {list(array.shape)} for input "
                    f"'{tensor.name}' (engine shape {list(tensor.shape)})"
                )
            buffer = self._memory.upload(array)
            context.set_tensor_address(tensor.name, buffer.address)
            keep.append(buffer)
        return keep

    def _bind_outputs(
        self, context: ExecutionContext
    ) -> dict[str, tuple[DeviceBuffer, tuple[int, ...]]]:
        buffers: dict[str, tuple[DeviceBuffer, tuple[int, ...]]] = {}
        for tensor in self.io.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(tensor.name))
            if any(d < 0 for d in shape):
                raise InternalError(
                    f"model '{self.name}': output '{tensor.name}' has data-dependent shape "
                    f"{list(shape)}, which this service does not support"
                )
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._output_types[tensor.name].itemsize
            buffer = self._memory.allocate(nbytes)
            context.set_tensor_address(tensor.name, buffer.address)
            buffers[tensor.name] = (buffer, shape)
        return buffers

    def unload(self) -> None:
        self._context = None
        self._engine = None
        self._trt_runtime = None


def _require_gpu_instance(model: str, instance: InstanceSpec) -> None:
    if instance.kind != mc.ModelInstanceGroup.KIND_GPU:
        kind = mc.ModelInstanceGroup.Kind.Name(instance.kind)
        raise ModelLoadError(
            f"model '{model}': instance {instance.name} is {kind}, but TensorRT engines run on a "
            "GPU; set instance_group kind: KIND_GPU"
        )
