"""The stateful example: ``simple_sequence``, an accumulator served by the sequence batcher
(config ``sequence_batching``: control inputs START / READY and an implicit state)."""

from __future__ import annotations

from onnx import TensorProto, helper

from examples.onnx_graph import BATCH, ExampleModel, finish_model, value_info

SEQUENCE_CONFIG = """name: "simple_sequence"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] }
  ]
  state [ { input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
}
"""


def build_simple_sequence() -> ExampleModel:
    """A stateful accumulator (Triton's ``simple_sequence``): OUTPUT is the sum of the INPUTs
    sent so far in the sequence. The server feeds START / READY and the implicit state ACC_IN
    (ACC_OUT of the sequence's previous request; zeros at START)."""
    shape: list[int | str] = [BATCH, 1]
    names = ("INPUT", "START", "READY", "ACC_IN")
    nodes = [
        helper.make_node("Sub", ["one", "START"], ["not_start"], name="not_start"),
        helper.make_node("Mul", ["ACC_IN", "not_start"], ["kept"], name="keep"),
        helper.make_node("Mul", ["INPUT", "READY"], ["added"], name="gate"),
        helper.make_node("Add", ["kept", "added"], ["ACC_OUT"], name="accumulate"),
        helper.make_node("Identity", ["ACC_OUT"], ["OUTPUT"], name="output"),
    ]
    graph = helper.make_graph(
        nodes,
        "simple_sequence",
        [value_info(n, TensorProto.INT32, shape) for n in names],
        [value_info(n, TensorProto.INT32, shape) for n in ("OUTPUT", "ACC_OUT")],
        initializer=[helper.make_tensor("one", TensorProto.INT32, [], [1])],
    )
    return ExampleModel(SEQUENCE_CONFIG, finish_model(graph), {})
