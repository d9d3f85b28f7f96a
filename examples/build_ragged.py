"""The ragged-batching example: ``simple_ragged``, whose requests carry vectors of any length
and still share a batch (config ``allow_ragged_batch``, ``batch_input``, ``batch_output``;
services/core/ragged.py).

Each request sends INPUT [batch, n] FP32 with its own n and gets, per batch item, SUM and MEAN
of its n values ([batch, 1]) and SCALED, its values doubled, shaped like its INPUT. The model
itself sees the batch as the runtime gets it: INPUT as one 1-D run of every item's values and
LENGTHS, which the server makes from the batch (BATCH_ITEM_SHAPE_FLATTEN: each item's n).
"""

from __future__ import annotations

from onnx import TensorProto, helper

from examples.onnx_graph import ExampleModel, finish_model, value_info

RAGGED_CONFIG = """name: "simple_ragged"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true } ]
batch_input [
  { kind: BATCH_ITEM_SHAPE_FLATTEN target_name: "LENGTHS" data_type: TYPE_INT32
    source_input: "INPUT" }
]
output [
  { name: "SUM" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "MEAN" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "SCALED" data_type: TYPE_FP32 dims: [ -1 ] }
]
batch_output [
  { target_name: "SCALED" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "INPUT" }
]
dynamic_batching { max_queue_delay_microseconds: 2000 }
"""


def build_simple_ragged() -> ExampleModel:
    """Per item: the sum of its slice of INPUT (prefix sums read at the item's end and start),
    the mean (sum / length; NaN for an empty item) and the slice doubled."""
    node = helper.make_node
    nodes = [
        node("CumSum", ["INPUT", "axis0"], ["prefix"], name="prefix_sums"),
        node("Concat", ["zero", "prefix"], ["prefix0"], axis=0, name="leading_zero"),
        node("Cast", ["LENGTHS"], ["lengths"], to=TensorProto.INT64, name="lengths"),
        node("CumSum", ["lengths", "axis0"], ["ends"], name="item_ends"),
        node("Sub", ["ends", "lengths"], ["starts"], name="item_starts"),
        node("Gather", ["prefix0", "ends"], ["at_end"], axis=0, name="at_end"),
        node("Gather", ["prefix0", "starts"], ["at_start"], axis=0, name="at_start"),
        node("Sub", ["at_end", "at_start"], ["sums"], name="sums"),
        node("Cast", ["LENGTHS"], ["lengths_f"], to=TensorProto.FLOAT, name="lengths_f"),
        node("Div", ["sums", "lengths_f"], ["means"], name="means"),
        node("Unsqueeze", ["sums", "axis1"], ["SUM"], name="sum_column"),
        node("Unsqueeze", ["means", "axis1"], ["MEAN"], name="mean_column"),
        node("Mul", ["INPUT", "two"], ["SCALED"], name="scaled"),
    ]
    graph = helper.make_graph(
        nodes,
        "simple_ragged",
        [
            value_info("INPUT", TensorProto.FLOAT, ["values"]),
            value_info("LENGTHS", TensorProto.INT32, ["items"]),
        ],
        [
            value_info("SUM", TensorProto.FLOAT, ["items", 1]),
            value_info("MEAN", TensorProto.FLOAT, ["items", 1]),
            value_info("SCALED", TensorProto.FLOAT, ["values"]),
        ],
        initializer=[
            helper.make_tensor("axis0", TensorProto.INT64, [], [0]),
            helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
            helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        ],
    )
    return ExampleModel(RAGGED_CONFIG, finish_model(graph), {})
