"""What every example ONNX model is built with: the IR version and opset onnxruntime reads, the
symbolic batch dimension, and ``ExampleModel`` (config text, graph, extra files)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import helper

#: onnxruntime 1.31 reads IR versions up to 13; onnx 1.23 would write 14 by default
IR_VERSION = 8
OPSET = 17
#: the symbolic batch dimension of every batched model
BATCH = "batch"


@dataclass(frozen=True, slots=True)
class ExampleModel:
    """One model directory: its config text, its ONNX graph and any extra files."""

    config: str
    model: onnx.ModelProto
    extra_files: dict[str, str]


def value_info(name: str, elem_type: int, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def finish_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="meshserve.examples",
    )
    onnx.checker.check_model(model)
    return model
