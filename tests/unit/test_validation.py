"""Request validation against model configs written as config.pbtxt text."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes
from services.core.errors import InvalidArgument
from services.core.requests import Array, InferRequest, RequestedOutput
from services.core.validation import RequestValidator, validate_request

SIMPLE = """
name: "simple"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ -1 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }
]
"""

UNBATCHED = """
name: "plain"
max_batch_size: 0
input [
  { name: "X" data_type: TYPE_FP32 dims: [ 2, -1 ] },
  { name: "MASK" data_type: TYPE_BOOL dims: [ 2 ] optional: true }
]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2, -1 ] } ]
"""

RESHAPED = """
name: "reshaped"
max_batch_size: 4
input [
  { name: "A" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } },
  { name: "B" data_type: TYPE_BF16 dims: [ -1, 3 ] reshape: { shape: [ 3, -1 ] } }
]
output [ { name: "Z" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""


def config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def zeros(datatype: str, *shape: int) -> Array:
    return np.zeros(shape, dtype=dtypes.BY_NAME[datatype].numpy)


def request(inputs: dict[str, Array], outputs: list[RequestedOutput] | None = None) -> InferRequest:
    return InferRequest(model_name="m", model_version="", inputs=inputs, outputs=outputs or [])


SIMPLE_CHECK = RequestValidator(config(SIMPLE))


def test_valid_batched_request_returns_batch_and_signature() -> None:
    req = request({"INPUT1": zeros("INT32", 3, 5), "INPUT0": zeros("INT32", 3, 16)})
    assert SIMPLE_CHECK(req) == (3, ((16,), (5,)))


def test_signature_differs_when_non_batch_shapes_differ() -> None:
    a = SIMPLE_CHECK(request({"INPUT0": zeros("INT32", 1, 16), "INPUT1": zeros("INT32", 1, 5)}))
    b = SIMPLE_CHECK(request({"INPUT0": zeros("INT32", 2, 16), "INPUT1": zeros("INT32", 2, 6)}))
    c = SIMPLE_CHECK(request({"INPUT0": zeros("INT32", 7, 16), "INPUT1": zeros("INT32", 7, 5)}))
    assert a[1] != b[1]
    assert a[1] == c[1]


def test_unknown_input() -> None:
    req = request({"INPUT0": zeros("INT32", 1, 16), "EXTRA": zeros("INT32", 1, 1)})
    with pytest.raises(
        InvalidArgument,
        match="unexpected input 'EXTRA' for model 'simple'; expected one of 'INPUT0', 'INPUT1'",
    ):
        SIMPLE_CHECK(req)


def test_missing_required_input() -> None:
    with pytest.raises(InvalidArgument, match="missing required input 'INPUT1' for model 'simple'"):
        SIMPLE_CHECK(request({"INPUT0": zeros("INT32", 1, 16)}))


def test_wrong_datatype_names_both() -> None:
    req = request({"INPUT0": zeros("FP32", 1, 16), "INPUT1": zeros("INT32", 1, 2)})
    with pytest.raises(
        InvalidArgument,
        match="input 'INPUT0' for model 'simple' has datatype FP32 but the model expects INT32",
    ):
        SIMPLE_CHECK(req)


def test_batch_size_limits() -> None:
    req = request({"INPUT0": zeros("INT32", 12, 16), "INPUT1": zeros("INT32", 12, 2)})
    with pytest.raises(InvalidArgument, match="batch size 12 exceeds max_batch_size 8 of model"):
        SIMPLE_CHECK(req)
    req = request({"INPUT0": zeros("INT32", 0, 16), "INPUT1": zeros("INT32", 0, 2)})
    with pytest.raises(InvalidArgument, match=r"batch size 0; .* must be 1\.\.8"):
        SIMPLE_CHECK(req)
    req = request({"INPUT0": zeros("INT32"), "INPUT1": zeros("INT32", 1, 2)})
    with pytest.raises(InvalidArgument, match=r"has no batch dimension.*send shape \[batch,16\]"):
        SIMPLE_CHECK(req)


def test_inputs_must_agree_on_batch_size() -> None:
    req = request({"INPUT0": zeros("INT32", 2, 16), "INPUT1": zeros("INT32", 3, 2)})
    with pytest.raises(
        InvalidArgument, match="input 'INPUT1' has batch size 3 but input 'INPUT0' has 2"
    ):
        SIMPLE_CHECK(req)


def test_shape_against_dims() -> None:
    req = request({"INPUT0": zeros("INT32", 1, 15), "INPUT1": zeros("INT32", 1, 2)})
    with pytest.raises(
        InvalidArgument,
        match=r"unexpected shape for input 'INPUT0' for model 'simple': got \[1,15\], expected"
        r" \[batch,16\]",
    ):
        SIMPLE_CHECK(req)
    req = request({"INPUT0": zeros("INT32", 1, 16), "INPUT1": zeros("INT32", 1, 2, 2)})
    with pytest.raises(InvalidArgument, match=r"got \[1,2,2\], expected \[batch,-1\]"):
        SIMPLE_CHECK(req)


def test_unbatched_model_and_optional_input() -> None:
    check = RequestValidator(config(UNBATCHED))
    assert check(request({"X": zeros("FP32", 2, 7)})) == (1, ((2, 7), None))
    with_mask = check(request({"X": zeros("FP32", 2, 7), "MASK": zeros("BOOL", 2)}))
    assert with_mask == (1, ((2, 7), (2,)))
    with pytest.raises(InvalidArgument, match=r"got \[1,2,7\], expected \[2,-1\]"):
        check(request({"X": zeros("FP32", 1, 2, 7)}))


def test_unknown_output_is_invalid_argument() -> None:
    req = request(
        {"INPUT0": zeros("INT32", 1, 16), "INPUT1": zeros("INT32", 1, 1)},
        [RequestedOutput("NOPE")],
    )
    with pytest.raises(
        InvalidArgument,
        match="unexpected inference output 'NOPE' for model 'simple'; the model has outputs"
        " 'OUTPUT0', 'TEXT'",
    ):
        SIMPLE_CHECK(req)


def test_classification_only_on_numeric_outputs() -> None:
    inputs = {"INPUT0": zeros("INT32", 1, 16), "INPUT1": zeros("INT32", 1, 1)}
    assert SIMPLE_CHECK(request(inputs, [RequestedOutput("OUTPUT0", classification=3)]))
    with pytest.raises(
        InvalidArgument, match=r"classification is not available for output 'TEXT'.*BYTES"
    ):
        SIMPLE_CHECK(request(inputs, [RequestedOutput("TEXT", classification=1)]))


def test_reshape_accepts_dims_and_hands_the_reshaped_view() -> None:
    check = RequestValidator(config(RESHAPED))
    a = zeros("FP32", 3, 1)
    b = zeros("BF16", 3, 4, 3)
    req = request({"A": a, "B": b})
    assert check(req) == (3, ((1,), (4, 3)))
    assert req.inputs["A"].shape == (3,)
    assert req.inputs["B"].shape == (3, 3, 4)
    assert np.shares_memory(req.inputs["A"], a)
    with pytest.raises(
        InvalidArgument, match=r"unexpected shape for input 'A'.*expected \[batch,1\]"
    ):
        check(request({"A": zeros("FP32", 3), "B": b}))


def test_bf16_is_not_uint16() -> None:
    check = RequestValidator(config(RESHAPED))
    req = request({"A": zeros("FP32", 1, 1), "B": zeros("UINT16", 1, 1, 3)})
    with pytest.raises(InvalidArgument, match="has datatype UINT16 but the model expects BF16"):
        check(req)


def test_fixed_width_string_arrays_count_as_bytes() -> None:
    text_model = config(
        'name: "t" max_batch_size: 2 input [ { name: "S" data_type: TYPE_STRING dims: [ 1 ] } ]'
    )
    assert validate_request(request({"S": np.array([[b"a"], [b"bc"]])}), text_model)[0] == 2
