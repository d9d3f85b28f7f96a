"""The generate extension's JSON mapping: body fields to inputs (dims with wildcards, the batch
dimension, datatypes) and parameters, and a response to its flat JSON and SSE forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import InvalidArgument
from services.core.http_generate import generate_request, generate_response, sse_event
from services.core.requests import InferResponse, OutputTensor

CONFIG = text_format.Parse(
    """
    name: "m" max_batch_size: 4
    input [
      { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
      { name: "grid" data_type: TYPE_FP32 dims: [ 2, -1 ] },
      { name: "flag" data_type: TYPE_BOOL dims: [ 1 ] optional: true }
    ]
    output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
    """,
    mc.ModelConfig(),
)


def test_fields_become_inputs_shaped_to_their_dims_with_a_batch_of_one() -> None:
    req = generate_request(
        {"text_input": "hi", "grid": [1, 2, 3, 4, 5, 6], "flag": True}, CONFIG, "m", "2"
    )
    assert (req.model_name, req.model_version) == ("m", "2")
    assert req.inputs["text_input"].shape == (1, 1)
    assert req.inputs["text_input"].tolist() == [[b"hi"]]
    grid = req.inputs["grid"]
    assert (grid.shape, grid.dtype) == ((1, 2, 3), np.float32)
    assert grid.tolist() == [[[1, 2, 3], [4, 5, 6]]]
    assert req.inputs["flag"].tolist() == [[True]]


def test_nested_lists_count_their_leaves_and_optional_inputs_may_be_left_out() -> None:
    req = generate_request({"text_input": ["x"], "grid": [[1, 2], [3, 4]]}, CONFIG, "m", "")
    assert req.inputs["grid"].shape == (1, 2, 2) and "flag" not in req.inputs


def test_parameters_priority_timeout_and_id() -> None:
    body = {
        "text_input": "x",
        "grid": [1, 2],
        "parameters": {"temperature": 0.2, "priority": 2, "timeout": 500},
        "max_tokens": 8,
        "stream": False,
        "id": "abc",
    }
    req = generate_request(body, CONFIG, "m", "")
    assert req.parameters == {"temperature": 0.2, "max_tokens": 8, "stream": False}
    assert (req.priority, req.timeout_us, req.id) == (2, 500, "abc")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"grid": [1, 2]}, "has no field 'text_input'"),
        ({"text_input": "x", "grid": [1, 2, 3]}, "send a multiple of 2"),
        ({"text_input": ["a", "b"], "grid": [1, 2]}, "2 value(s) cannot fill; send 1"),
        ({"text_input": 5, "grid": [1, 2]}, "must hold strings"),
        ({"text_input": "x", "grid": ["a", "b"]}, "must hold numbers"),
        ({"text_input": "x", "grid": [1, 2], "other": [1]}, "field 'other'"),
        ({"text_input": "x", "grid": [1, 2], "parameters": []}, "parameters"),
    ],
)
def test_bad_bodies_say_what_to_fix(body: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate_request(body, CONFIG, "m", "")


def test_a_response_is_flat_json_and_one_sse_event() -> None:
    response = InferResponse(
        "m",
        "1",
        "r1",
        [
            OutputTensor("text_output", "BYTES", np.array([[b"hello"]], dtype=np.object_)),
            OutputTensor("scores", "FP32", np.array([[0.5, 0.25]], dtype=np.float32)),
        ],
    )
    doc = generate_response(response)
    assert doc == {
        "model_name": "m",
        "model_version": "1",
        "id": "r1",
        "text_output": "hello",
        "scores": [0.5, 0.25],
    }
    event = sse_event(doc)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[len(b"data: ") :]) == doc
