"""http_codec and http_json without a server: tensors in, bodies out, protobuf as JSON."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes
from services.core.errors import InvalidArgument
from services.core.http_codec import decode_infer_request, encode_infer_response
from services.core.http_json import message_to_json
from services.core.requests import InferResponse, OutputTensor, SharedMemoryRef


def decode(doc: dict[str, object], tail: bytes = b"") -> tuple[object, bool]:
    header = json.dumps(doc).encode()
    length = str(len(header)) if tail else None
    return decode_infer_request(header + tail, length, "m", "", None, arrival_ns=5)


def test_json_inputs_nested_flat_and_typed() -> None:
    req, binary = decode(
        {
            "id": "x",
            "parameters": {"priority": 2, "timeout": 100, "binary_data_output": True, "k": "v"},
            "inputs": [
                {"name": "A", "shape": [2, 2], "datatype": "FP16", "data": [[1, 2], [3.5, 4]]},
                {"name": "B", "shape": [3], "datatype": "BOOL", "data": [True, False, True]},
                {"name": "C", "shape": [1, 2], "datatype": "BYTES", "data": [["hé", "b"]]},
                {"name": "D", "shape": [1], "datatype": "BF16", "data": [1.0]},
            ],
            "outputs": [{"name": "O", "parameters": {"classification": 2, "binary_data": False}}],
        }
    )
    assert binary is True
    assert req.id == "x" and req.priority == 2 and req.timeout_us == 100  # type: ignore[attr-defined]
    assert req.parameters == {"k": "v"}  # type: ignore[attr-defined]
    inputs = req.inputs  # type: ignore[attr-defined]
    assert inputs["A"].dtype == np.float16 and inputs["A"].tolist() == [[1, 2], [3.5, 4]]
    assert inputs["B"].dtype == np.bool_
    assert inputs["C"].tolist() == [["hé".encode(), b"b"]]
    assert inputs["D"].dtype == dtypes.BF16_DTYPE and inputs["D"].view(np.uint16)[0] == 0x3F80
    out = req.outputs[0]  # type: ignore[attr-defined]
    assert (out.name, out.classification, out.binary_data) == ("O", 2, False)


def test_json_uint64_beyond_int64_is_exact() -> None:
    values = [0, 2**64 - 1, 2**63, 7]
    req, _ = decode({"inputs": [{"name": "U", "shape": [4], "datatype": "UINT64", "data": values}]})
    decoded = req.inputs["U"]  # type: ignore[attr-defined]
    assert decoded.dtype == np.uint64 and decoded.tolist() == values
    # a float among them is still refused for an integer type, as is a bool
    for bad in ([1, 2.5, 2**64 - 1, 0], [True, 2**64 - 1, 0, 1]):
        with pytest.raises(InvalidArgument):
            decode({"inputs": [{"name": "U", "shape": [4], "datatype": "UINT64", "data": bad}]})


def test_binary_inputs_are_views_over_the_body() -> None:
    a = np.arange(6, dtype=np.float32)
    strings = struct.pack("<I", 2) + b"hi" + struct.pack("<I", 0)
    req, _ = decode(
        {
            "inputs": [
                {
                    "name": "A",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": a.nbytes},
                },
                {
                    "name": "S",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(strings)},
                },
            ]
        },
        a.tobytes() + strings,
    )
    got = req.inputs["A"]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, a.reshape(2, 3))
    assert not got.flags.writeable and not got.flags.owndata
    assert req.inputs["S"].tolist() == [b"hi", b""]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("item", "text"),
    [
        ({"name": "A", "shape": [2], "datatype": "INT32", "data": [1]}, "needs 2 elements"),
        ({"name": "A", "shape": [1], "datatype": "INT32", "data": [1.5]}, "input 'A'"),
        ({"name": "A", "shape": [1], "datatype": "BOOL", "data": [1]}, "true/false"),
        ({"name": "A", "shape": [1], "datatype": "INT8", "data": [300]}, "does not fit INT8"),
        ({"name": "A", "shape": [2], "datatype": "INT32", "data": [[1], [2, 3]]}, "nesting"),
        ({"name": "A", "shape": [1], "datatype": "BYTES", "data": [1]}, "must hold strings"),
        ({"name": "A", "shape": [-1], "datatype": "INT32", "data": []}, "non-negative"),
        ({"name": "A", "shape": [1], "datatype": "INT32"}, "no 'data'"),
        ({"shape": [1], "datatype": "INT32", "data": [1]}, r"inputs\[0\] has no 'name'"),
    ],
)
def test_malformed_inputs_name_the_input(item: dict[str, object], text: str) -> None:
    with pytest.raises(InvalidArgument, match=text):
        decode({"inputs": [item]})


def test_unclaimed_binary_tail_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="no input claims"):
        decode({"inputs": [{"name": "A", "shape": [1], "datatype": "INT8", "data": [1]}]}, b"xx")


def test_encode_json_binary_and_shared_memory_outputs() -> None:
    resp = InferResponse(
        "m",
        "1",
        "id-1",
        [
            OutputTensor("J", "INT32", np.arange(4, dtype=np.int32).reshape(2, 2)),
            OutputTensor("B", "FP32", np.ones(3, np.float32), binary_data=True),
            OutputTensor("S", "BYTES", np.array([b"a", b"bc"], dtype=object)),
            OutputTensor("H", "BF16", dtypes.float32_to_bf16(np.array([1.5], np.float32))),
            OutputTensor(
                "M", "INT8", np.zeros(2, np.int8), shared_memory=SharedMemoryRef("r", 2, 4)
            ),
        ],
    )
    body, length = encode_infer_response(resp, binary_default=False)
    assert length is not None
    doc = json.loads(body[:length])
    assert doc["id"] == "id-1"
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert by_name["J"] == {"name": "J", "datatype": "INT32", "shape": [2, 2], "data": [0, 1, 2, 3]}
    assert by_name["B"]["parameters"] == {"binary_data_size": 12}
    assert by_name["S"]["data"] == ["a", "bc"]
    assert by_name["H"]["data"] == [1.5]
    # written to its region: no data, and no parameters (Triton's C++ client reads those as
    # binary data)
    assert by_name["M"] == {"name": "M", "datatype": "INT8", "shape": [2]}
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32), np.ones(3))
    all_binary, length = encode_infer_response(resp, binary_default=True)
    assert length is not None and len(all_binary) > length + 12


def test_non_utf8_bytes_in_json_output_says_to_ask_for_binary() -> None:
    resp = InferResponse("m", "1", "", [OutputTensor("S", "BYTES", np.array([b"\xff"], object))])
    with pytest.raises(InvalidArgument, match="binary_data"):
        encode_infer_response(resp, binary_default=False)


def test_message_to_json_keeps_int64_as_numbers() -> None:
    config = mc.ModelConfig(name="m", max_batch_size=4)
    config.input.add(name="I", data_type=mc.TYPE_FP32, dims=[3, -1])
    config.dynamic_batching.max_queue_delay_microseconds = 100
    config.dynamic_batching.preferred_batch_size.extend([2, 4])
    out = message_to_json(config)
    assert out["input"][0]["dims"] == [3, -1]
    assert out["input"][0]["data_type"] == "TYPE_FP32"
    assert out["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert out["max_batch_size"] == 4
    stats = pb.ModelStatisticsResponse()
    s = stats.model_stats.add(name="m", version="1", inference_count=7)
    s.inference_stats.success.count = 3
    rendered = message_to_json(stats)["model_stats"][0]
    assert rendered["inference_count"] == 7
    assert rendered["inference_stats"]["success"] == {"count": 3, "ns": 0}
    assert rendered["execution_count"] == 0
