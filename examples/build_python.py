"""Build the Python-backend example models: Triton ``model.py`` files as a Triton user writes them.

``python -m examples.build_python <dir>`` writes ``<dir>/<model>/config.pbtxt`` and
``<dir>/<model>/1/model.py`` (``backend: "python"``), served by services/python:

- ``add_sub_python``: Triton's classic add_sub example (FP32 INPUT0, INPUT1 [4] → OUTPUT0 sum,
  OUTPUT1 difference), written the way Triton's example is, with ``pb_utils`` helpers;
- ``identity_python``: BYTES in, the same BYTES out (batched, dynamic batching);
- ``dtypes_python``: identity per datatype for the conformance suite: ``IN_<DTYPE>`` [-1] →
  ``OUT_<DTYPE>`` unchanged for all 14 Triton datatypes (BF16 reaches the model as numpy's raw
  16-bit "V2" values, BYTES as object arrays of ``bytes``, any bytes), max_batch_size 8;
- ``failing_python``: ``execute`` raises ValueError("boom"): the error reaches the client;
- ``bad_init_python``: ``initialize`` raises: the model is UNAVAILABLE with that reason;
- ``bls_python``: BLS: ``execute`` calls ``simple`` (the ONNX add/sub model of
  examples/build_repository.py, INT32 INPUT0/INPUT1 [16]) through the gateway and returns its
  OUTPUT0 doubled; a request parameter ``bls_model`` names another model to call instead, and
  when that call fails (e.g. an unknown model) the client gets the BLS error's text;
- ``repeat_python``: a decoupled model (one response per input element, then the FINAL flag;
  examples/python_decoupled.py).
- ``repeat_count_python``: a batched decoupled model, the first step of the decoupled ensemble
  ``repeat_then_simple`` (examples/python_decoupled.py).
- ``bls_decoupled_python``: decoupled BLS: calls ``repeat_python`` with ``exec(decoupled=True)``
  (or ``async_exec``, by request parameter) and returns what it streamed, joined into one response
  (examples/python_decoupled.py).
- ``text_stream_python``: an LLM-shaped decoupled model for the generate extension (``text_input``
  → one ``text_output`` response per word; examples/python_text_stream.py).
- ``sequence_python``: a stateful model (``sequence_batching``, two instances): the running sum
  of INPUT per sequence, kept in the model by ``correlation_id()`` (examples/python_sequence.py).

The steps of the ensembles in examples/build_ensemble.py (all batched, max_batch_size 8, dynamic
batching; shapes below leave out the batch dimension):

- ``preprocess_image_python`` (needs Pillow: the ``python`` extra): IMAGE BYTES [1] (encoded
  PNG/JPEG/... bytes) → PIXELS FP32 [3, 64, 64], ``cnn``'s INPUT0: decoded, RGB, resized to 64x64
  (bilinear), scaled to [0, 1], normalised with ImageNet's mean and std, HWC → CHW. The size is
  read from PIXELS's dims. Bytes Pillow cannot decode fail their request with INVALID_ARG.
- ``topk_python``: SCORES FP32 [10] (``cnn``'s OUTPUT0) → LABELS BYTES [k] and PROBS FP32 [k]: the
  k most likely of ``labels.txt`` (in its model directory, ``cnn``'s labels) after a softmax,
  most likely first (ties: lower index first); k is the config parameter ``top_k`` (default 3)
  and must match the outputs' dims.
- ``slow_a_python`` / ``slow_b_python``: INT32 INPUT0 [16] → OUTPUT0 = INPUT0 * scale + offset
  after sleeping ``delay_ms`` (once per batch); parameters: a: scale 2, offset 0; b: scale 1,
  offset 1; both delay_ms 400. Used to show that independent ensemble steps run concurrently.

Rebuilding is idempotent, as for examples/build_repository.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from examples.cli import TRITON_DATATYPES, builder_main, write_if_changed
from examples.python_decoupled import (
    BLS_DECOUPLED_CONFIG,
    BLS_DECOUPLED_MODEL,
    REPEAT_CONFIG,
    REPEAT_COUNT_CONFIG,
    REPEAT_COUNT_MODEL,
    REPEAT_MODEL,
)
from examples.python_ensemble_steps import (
    PREPROCESS_IMAGE_CONFIG,
    PREPROCESS_IMAGE_MODEL,
    SLOW_MODEL,
    TOPK_CONFIG,
    TOPK_LABELS_TXT,
    TOPK_MODEL,
    slow_config,
)
from examples.python_sequence import SEQUENCE_PYTHON_CONFIG, SEQUENCE_PYTHON_MODEL
from examples.python_text_stream import TEXT_STREAM_CONFIG, TEXT_STREAM_MODEL

ADD_SUB_CONFIG = """name: "add_sub_python"
backend: "python"
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "OUTPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
instance_group [ { kind: KIND_CPU } ]
"""

ADD_SUB_MODEL = '''"""Triton's add_sub example.

OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1.
"""

import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = model_config = json.loads(args["model_config"])
        output0_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT0")
        output1_config = pb_utils.get_output_config_by_name(model_config, "OUTPUT1")
        self.output0_dtype = pb_utils.triton_string_to_numpy(output0_config["data_type"])
        self.output1_dtype = pb_utils.triton_string_to_numpy(output1_config["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            in_0 = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            in_1 = pb_utils.get_input_tensor_by_name(request, "INPUT1")
            out_0 = in_0.as_numpy() + in_1.as_numpy()
            out_1 = in_0.as_numpy() - in_1.as_numpy()
            out_tensor_0 = pb_utils.Tensor("OUTPUT0", out_0.astype(self.output0_dtype))
            out_tensor_1 = pb_utils.Tensor("OUTPUT1", out_1.astype(self.output1_dtype))
            inference_response = pb_utils.InferenceResponse(
                output_tensors=[out_tensor_0, out_tensor_1]
            )
            responses.append(inference_response)
        return responses

    def finalize(self):
        print("Cleaning up...")
'''

IDENTITY_CONFIG = """name: "identity_python"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
dynamic_batching { }
"""

IDENTITY_MODEL = '''"""Returns its BYTES input unchanged, one response per request."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return responses
'''

#: the datatypes of ``dtypes_python``: all of Triton's
DTYPES_DATATYPES = TRITON_DATATYPES


def _dtypes_config(datatypes: Sequence[str]) -> str:
    """The config of ``dtypes_python``: IN_<DTYPE> → OUT_<DTYPE>, dims [ -1 ], per datatype."""

    def entries(prefix: str) -> str:
        return ",\n".join(
            f'  {{ name: "{prefix}_{d}" data_type: TYPE_{"STRING" if d == "BYTES" else d}'
            " dims: [ -1 ] }"
            for d in datatypes
        )

    return f"""name: "dtypes_python"
backend: "python"
max_batch_size: 8
input [
{entries("IN")}
]
output [
{entries("OUT")}
]
dynamic_batching {{ }}
"""


DTYPES_MODEL = '''"""Returns every input IN_<DTYPE> unchanged as the output OUT_<DTYPE>."""

import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.names = [(i["name"], "OUT_" + i["name"][len("IN_") :]) for i in config["input"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            outputs = [
                pb_utils.Tensor(out, pb_utils.get_input_tensor_by_name(request, name).as_numpy())
                for name, out in self.names
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
'''

FAILING_CONFIG = """name: "failing_python"
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

FAILING_MODEL = '''"""A model whose execute always raises, to show the error reaching the client."""


class TritonPythonModel:
    def execute(self, requests):
        raise ValueError("boom")
'''

BAD_INIT_CONFIG = """name: "bad_init_python"
backend: "python"
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""

BAD_INIT_MODEL = '''"""A model whose initialize raises, so it never becomes ready."""


class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights file missing: cannot initialize")

    def execute(self, requests):
        return []
'''

BLS_CONFIG = """name: "bls_python"
backend: "python"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] } ]
instance_group [ { kind: KIND_CPU } ]
"""

BLS_MODEL = '''"""BLS: OUTPUT0 = 2 * (INPUT0 + INPUT1), the sum computed by the model ``simple``.

The request parameter ``bls_model`` names the model to call instead of ``simple``; when the call
fails, the response carries the BLS error's text.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            target = json.loads(request.parameters()).get("bls_model", "simple")
            bls_request = pb_utils.InferenceRequest(
                model_name=target,
                requested_output_names=["OUTPUT0"],
                inputs=[
                    pb_utils.get_input_tensor_by_name(request, "INPUT0"),
                    pb_utils.get_input_tensor_by_name(request, "INPUT1"),
                ],
            )
            bls_response = bls_request.exec()
            if bls_response.has_error():
                error = pb_utils.TritonError(
                    f"BLS call to '{target}' failed: {bls_response.error().message()}"
                )
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            total = pb_utils.get_output_tensor_by_name(bls_response, "OUTPUT0").as_numpy()
            doubled = pb_utils.Tensor("OUTPUT0", (total * 2).astype(np.int32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[doubled]))
        return responses
'''

#: model name → (config.pbtxt, 1/model.py)
EXAMPLES: dict[str, tuple[str, str]] = {
    "add_sub_python": (ADD_SUB_CONFIG, ADD_SUB_MODEL),
    "identity_python": (IDENTITY_CONFIG, IDENTITY_MODEL),
    "dtypes_python": (_dtypes_config(DTYPES_DATATYPES), DTYPES_MODEL),
    "failing_python": (FAILING_CONFIG, FAILING_MODEL),
    "bad_init_python": (BAD_INIT_CONFIG, BAD_INIT_MODEL),
    "bls_python": (BLS_CONFIG, BLS_MODEL),
    "preprocess_image_python": (PREPROCESS_IMAGE_CONFIG, PREPROCESS_IMAGE_MODEL),
    "topk_python": (TOPK_CONFIG, TOPK_MODEL),
    "slow_a_python": (slow_config("slow_a_python", scale=2, offset=0), SLOW_MODEL),
    "slow_b_python": (slow_config("slow_b_python", scale=1, offset=1), SLOW_MODEL),
    "repeat_python": (REPEAT_CONFIG, REPEAT_MODEL),
    "bls_decoupled_python": (BLS_DECOUPLED_CONFIG, BLS_DECOUPLED_MODEL),
    "repeat_count_python": (REPEAT_COUNT_CONFIG, REPEAT_COUNT_MODEL),
    "text_stream_python": (TEXT_STREAM_CONFIG, TEXT_STREAM_MODEL),
    "sequence_python": (SEQUENCE_PYTHON_CONFIG, SEQUENCE_PYTHON_MODEL),
}
#: model name → other files of its model directory (name → text)
EXTRA_FILES: dict[str, dict[str, str]] = {
    "topk_python": {"labels.txt": TOPK_LABELS_TXT},
}


def build_python_repository(root: Path, names: Iterable[str] | None = None) -> None:
    """Write the named Python example models (all when ``names`` is None) under ``root``."""
    wanted = list(EXAMPLES) if names is None else list(names)
    unknown = [n for n in wanted if n not in EXAMPLES]
    if unknown:
        raise ValueError(
            f"unknown Python example model(s) {unknown}; choose from {sorted(EXAMPLES)}"
        )
    for name in wanted:
        config, model = EXAMPLES[name]
        write_if_changed(root / name / "config.pbtxt", config)
        write_if_changed(root / name / "1" / "model.py", model)
        for filename, text in EXTRA_FILES.get(name, {}).items():
            write_if_changed(root / name / filename, text)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build these examples into a repository directory."""
    return builder_main(
        argv,
        prog="python -m examples.build_python",
        description="Build the Python-backend example models (Triton model.py files).",
        names=EXAMPLES,
        build=build_python_repository,
        label="Python example models",
    )


if __name__ == "__main__":
    sys.exit(main())
