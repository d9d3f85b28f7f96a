"""ONNX auto-complete: fill what a model's config.pbtxt leaves out from the ONNX file itself.

The model repository (services/core) calls ``OnnxRuntime.autocomplete`` before it validates a
config; this module does the work, following Triton's onnxruntime backend so that a bare
repository (a model file and no config, or a config naming only some tensors) loads as it would
under Triton:

- inputs: every model input missing from the config is added; outputs: all of them when the
  config lists none (a config that lists some outputs chose a subset, which is kept);
- a tensor the user named but left without ``data_type`` / ``dims`` gets them from the model;
- ``max_batch_size``: the user's value when set (> 0); otherwise, when every model input and
  output has a dynamic first dimension (and no user-written dims say otherwise), the default of 4
  with ``dynamic_batching`` when no scheduler is configured; otherwise 0 (no batching);
- dims leave out the batch dimension when batching; dynamic dimensions become -1;
- ``platform`` / ``backend`` are filled only where empty.
Nothing the user wrote is overwritten.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
#: Triton's --backend-config=onnxruntime,default-max-batch-size default
DEFAULT_MAX_BATCH_SIZE = 4

#: ONNX Runtime's tensor type strings → Triton config data types
ONNX_TO_CONFIG: dict[str, int] = {
    "tensor(bool)": mc.TYPE_BOOL,
    "tensor(uint8)": mc.TYPE_UINT8,
    "tensor(uint16)": mc.TYPE_UINT16,
    "tensor(uint32)": mc.TYPE_UINT32,
    "tensor(uint64)": mc.TYPE_UINT64,
    "tensor(int8)": mc.TYPE_INT8,
    "tensor(int16)": mc.TYPE_INT16,
    "tensor(int32)": mc.TYPE_INT32,
    "tensor(int64)": mc.TYPE_INT64,
    "tensor(float16)": mc.TYPE_FP16,
    "tensor(float)": mc.TYPE_FP32,
    "tensor(double)": mc.TYPE_FP64,
    "tensor(string)": mc.TYPE_STRING,
    "tensor(bfloat16)": mc.TYPE_BF16,
}

Dim = int | str | None


@dataclass(frozen=True, slots=True)
class ModelTensor:
    """One input or output as the ONNX graph declares it."""

    name: str
    onnx_type: str
    shape: tuple[Dim, ...]

    @property
    def data_type(self) -> int:
        return ONNX_TO_CONFIG.get(self.onnx_type, mc.TYPE_INVALID)

    @property
    def batchable(self) -> bool:
        """True when the first dimension is dynamic (symbolic, unknown or -1)."""
        return bool(self.shape) and not (isinstance(self.shape[0], int) and self.shape[0] >= 0)

    def dims(self, batching: bool) -> list[int]:
        shape = self.shape[1:] if batching else self.shape
        return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def describe(session: Any) -> tuple[list[ModelTensor], list[ModelTensor]]:
    """The inputs and outputs of a loaded InferenceSession."""

    def tensors(args: Iterable[Any]) -> list[ModelTensor]:
        return [ModelTensor(a.name, a.type, tuple(a.shape or ())) for a in args]

    return tensors(session.get_inputs()), tensors(session.get_outputs())


def inspect_model(model_name: str, model_path: Path) -> tuple[list[ModelTensor], list[ModelTensor]]:
    """Open the ONNX file just to read its inputs and outputs (no graph optimization)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(
            f"model '{model_name}': cannot read ONNX file {model_path}: {exc}"
        ) from exc
    return describe(session)


def _user_batching_hint(config: mc.ModelConfig, tensors: Sequence[ModelTensor]) -> bool | None:
    """What user-written dims imply: True (one shorter than the model: batching), False, None."""
    by_name = {t.name: t for t in tensors}
    written: list[tuple[str, int]] = [
        (io.name, len(io.dims)) for io in config.input if io.dims and not io.HasField("reshape")
    ]
    written += [
        (io.name, len(io.dims)) for io in config.output if io.dims and not io.HasField("reshape")
    ]
    for name, rank in written:
        tensor = by_name.get(name)
        if tensor is None:
            continue
        if rank == len(tensor.shape):
            return False
        if rank == len(tensor.shape) - 1:
            return True
    return None


def _fill(io: Any, tensor: ModelTensor, batching: bool) -> None:
    if io.data_type == mc.TYPE_INVALID:
        io.data_type = tensor.data_type
    if not io.dims and not io.HasField("reshape"):
        io.dims.extend(tensor.dims(batching))


def complete_config(
    config: mc.ModelConfig, inputs: Sequence[ModelTensor], outputs: Sequence[ModelTensor]
) -> None:
    """Apply the auto-complete rules (module docstring) to ``config`` in place."""
    if not config.platform and not config.backend:
        config.platform = PLATFORM
        config.backend = BACKEND
    elif not config.backend and config.platform == PLATFORM:
        config.backend = BACKEND

    if config.max_batch_size == 0:
        hint = _user_batching_hint(config, [*inputs, *outputs])
        model_can_batch = all(t.batchable for t in [*inputs, *outputs])
        if model_can_batch and hint is not False:
            config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    batching = config.max_batch_size > 0
    if config.max_batch_size > 1 and config.WhichOneof("scheduling_choice") is None:
        config.dynamic_batching.SetInParent()

    named_inputs = {io.name: io for io in config.input}
    for tensor in inputs:
        model_input = named_inputs.get(tensor.name)
        if model_input is None:
            model_input = config.input.add(name=tensor.name)
        _fill(model_input, tensor, batching)

    if not config.output:
        for tensor in outputs:
            config.output.add(name=tensor.name)
    model_outputs = {t.name: t for t in outputs}
    for io in config.output:
        if io.name in model_outputs:
            _fill(io, model_outputs[io.name], batching)


def autocomplete(config: mc.ModelConfig, model_path: Path) -> None:
    """Read ``model_path`` and complete ``config`` from it."""
    inputs, outputs = inspect_model(config.name, model_path)
    complete_config(config, inputs, outputs)
