"""ONNX auto-complete: fill what a model's config.pbtxt leaves out from the ONNX file itself.

The model repository (services/core) calls ``OnnxRuntime.autocomplete`` before it validates a
config; this module reads the ONNX file's inputs and outputs and applies Triton's auto-complete
rules (services/core/autocomplete.py), so that a bare repository (a model file and no config, or a
config naming only some tensors) loads as it would under Triton's onnxruntime backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from protos.gen.inference import model_config_pb2 as mc
from services.core.autocomplete import complete_io
from services.core.errors import ModelLoadError

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"

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

    @property
    def rank(self) -> int:
        return len(self.shape)

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


def complete_config(
    config: mc.ModelConfig, inputs: Sequence[ModelTensor], outputs: Sequence[ModelTensor]
) -> None:
    """Apply Triton's auto-complete rules (services/core/autocomplete.py) to ``config``."""
    complete_io(config, inputs, outputs, platform=PLATFORM, backend=BACKEND)


def autocomplete(config: mc.ModelConfig, model_path: Path) -> None:
    """Read ``model_path`` and complete ``config`` from it."""
    inputs, outputs = inspect_model(config.name, model_path)
    complete_config(config, inputs, outputs)
