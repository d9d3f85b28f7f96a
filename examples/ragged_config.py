"""The ragged-batching config of the PyTorch and TensorFlow examples (``simple_ragged_torch``,
``simple_ragged_tf``); the ONNX one, ``simple_ragged``, also has a MEAN output
(examples/build_ragged.py). Requests send VALUES [batch, n] FP32 with any n; the model gets every
request's values as one 1-D run and the batch input the server builds (``kind``), and answers
SUM per item and SCALED, the values doubled, which each request gets back in its own shape."""

from __future__ import annotations


def ragged_config(name: str, platform: str, kind: str, names: tuple[str, str, str, str]) -> str:
    """The config: names are (values input, batch input, sum output, scaled output)."""
    values, extra, sums, scaled = names
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: 8
input [ {{ name: "{values}" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true }} ]
batch_input [
  {{ kind: {kind} target_name: "{extra}" data_type: TYPE_INT32 source_input: "{values}" }}
]
output [
  {{ name: "{sums}" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "{scaled}" data_type: TYPE_FP32 dims: [ -1 ] }}
]
batch_output [
  {{ target_name: "{scaled}" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "{values}" }}
]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
"""
