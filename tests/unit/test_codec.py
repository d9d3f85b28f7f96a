"""Decoding requests built by stock tritonclient, and every way a request can be malformed.

Requests are built by tritonclient's own request builder (the one InferenceServerClient.infer
uses) so the wire form is exactly what clients send.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc._utils import _get_inference_request

from protos.gen.inference import grpc_service_pb2 as pb
from services.core import dtypes
from services.core.codec import decode_infer_request
from services.core.errors import InvalidArgument, NotFound, Unsupported
from services.core.requests import Array, SharedMemoryRef
from tests.unit.tensor_samples import ALL, assert_same, sample


def client_request(
    inputs: list[grpcclient.InferInput],
    outputs: list[grpcclient.InferRequestedOutput] | None = None,
    **kwargs: Any,
) -> pb.ModelInferRequest:
    options: dict[str, Any] = {
        "model_version": "",
        "request_id": "",
        "sequence_id": 0,
        "sequence_start": False,
        "sequence_end": False,
        "priority": 0,
        "timeout": None,
        "parameters": None,
    }
    options.update(kwargs)
    request: pb.ModelInferRequest = _get_inference_request(
        model_name="m", inputs=inputs, outputs=outputs, **options
    )
    return request


def client_input(name: str, data: Array, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


class FakeRegions:
    """Fake of shm.py's reader: named byte buffers in process memory (no OS shared memory)."""

    def __init__(self, **regions: bytearray) -> None:
        self.regions = regions

    def read(
        self, region: str, offset: int, byte_size: int, *, tensor: str | None = None
    ) -> memoryview:
        if region not in self.regions:
            raise NotFound(f"unknown region '{region}'")
        return memoryview(self.regions[region])[offset : offset + byte_size]


# --- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL)
def test_raw_round_trip_every_datatype(datatype: str) -> None:
    data = sample(datatype)
    msg = client_request([client_input("IN", data, datatype)])
    req = decode_infer_request(msg, None)
    assert list(req.inputs) == ["IN"]
    assert_same(req.inputs["IN"], data, datatype)


@pytest.mark.parametrize("datatype", ALL)
def test_empty_tensor_every_datatype(datatype: str) -> None:
    data = sample(datatype, (0, 4))
    req = decode_infer_request(client_request([client_input("IN", data, datatype)]), None)
    assert req.inputs["IN"].shape == (0, 4)
    assert req.inputs["IN"].dtype == dtypes.BY_NAME[datatype].numpy


def test_several_inputs_keep_their_raw_entry() -> None:
    a, b, c = sample("FP32"), sample("BYTES", (3,)), sample("INT64", (1, 5))
    msg = client_request(
        [client_input("A", a, "FP32"), client_input("B", b, "BYTES"), client_input("C", c, "INT64")]
    )
    req = decode_infer_request(msg, None)
    assert_same(req.inputs["A"], a, "FP32")
    assert_same(req.inputs["B"], b, "BYTES")
    assert_same(req.inputs["C"], c, "INT64")


def test_raw_inputs_are_views_not_copies() -> None:
    msg = client_request([client_input("IN", sample("FP32", (64, 64)), "FP32")])
    arr = decode_infer_request(msg, None).inputs["IN"]
    assert not arr.flags.owndata
    base: object = arr
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes)
    assert base == msg.raw_input_contents[0]
    assert np.shares_memory(arr, np.frombuffer(base, dtype=np.uint8))
    assert not arr.flags.writeable


def test_request_fields_and_parameters() -> None:
    outputs = [grpcclient.InferRequestedOutput("PROBS", class_count=3)]
    shm_out = grpcclient.InferRequestedOutput("RAW")
    shm_out.set_shared_memory("out_region", 64, offset=16)
    msg = client_request(
        [client_input("IN", sample("FP32"), "FP32")],
        [*outputs, shm_out],
        model_version="2",
        request_id="req-42",
        sequence_id=9,
        sequence_start=True,
        priority=3,
        timeout=1500,
        parameters={"flag": True, "name": "x", "count": 5, "ratio": 0.5},
    )
    req = decode_infer_request(msg, None, arrival_ns=123)
    assert (req.model_name, req.model_version, req.id) == ("m", "2", "req-42")
    assert (req.priority, req.timeout_us, req.arrival_ns) == (3, 1500, 123)
    assert req.parameters == {
        "flag": True,
        "name": "x",
        "count": 5,
        "ratio": 0.5,
        "sequence_id": 9,
        "sequence_start": True,
        "sequence_end": False,
    }
    assert [(o.name, o.classification, o.shared_memory) for o in req.outputs] == [
        ("PROBS", 3, None),
        ("RAW", 0, SharedMemoryRef(region="out_region", byte_size=64, offset=16)),
    ]


def test_arrival_defaults_to_now() -> None:
    req = decode_infer_request(client_request([client_input("IN", sample("INT8"), "INT8")]), None)
    assert req.arrival_ns > 0


TYPED: list[tuple[str, str, Any]] = [
    ("BOOL", "bool_contents", [True, False, True, True]),
    ("INT8", "int_contents", [-128, 127, 0, 5]),
    ("INT16", "int_contents", [-32768, 32767, 0, 5]),
    ("INT32", "int_contents", [-(2**31), 2**31 - 1, 0, 5]),
    ("INT64", "int64_contents", [-(2**63), 2**63 - 1, 0, 5]),
    ("UINT8", "uint_contents", [0, 255, 1, 2]),
    ("UINT16", "uint_contents", [0, 65535, 1, 2]),
    ("UINT32", "uint_contents", [0, 2**32 - 1, 1, 2]),
    ("UINT64", "uint64_contents", [0, 2**64 - 1, 1, 2]),
    ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 1e30]),
    ("FP64", "fp64_contents", [0.5, -1.25, 3.0, 1e300]),
    ("BYTES", "bytes_contents", [b"", b"a\x00b", b"\xff", "é".encode()]),
]


def typed_request(datatype: str, field: str, values: Any, shape: tuple[int, ...] = (2, 2)) -> Any:
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="IN", datatype=datatype, shape=list(shape))
    getattr(tensor.contents, field).extend(values)
    return msg


@pytest.mark.parametrize(("datatype", "field", "values"), TYPED)
def test_typed_contents_every_datatype(datatype: str, field: str, values: Any) -> None:
    arr = decode_infer_request(typed_request(datatype, field, values), None).inputs["IN"]
    expected = np.array(values, dtype=dtypes.BY_NAME[datatype].numpy).reshape(2, 2)
    assert arr.dtype == expected.dtype
    assert arr.tolist() == expected.tolist()


def test_shared_memory_input_is_a_view_of_the_region() -> None:
    data = np.arange(6, dtype=np.float32)
    region = bytearray(8) + bytearray(data.tobytes())
    tensor = grpcclient.InferInput("IN", [2, 3], "FP32")
    tensor.set_shared_memory("in_region", data.nbytes, offset=8)
    req = decode_infer_request(client_request([tensor]), FakeRegions(in_region=region))
    arr = req.inputs["IN"]
    assert arr.tolist() == data.reshape(2, 3).tolist()
    region[8:12] = np.float32(42).tobytes()
    assert arr[0, 0] == 42


def test_shared_memory_and_raw_inputs_mix() -> None:
    text = sample("BYTES", (4,))
    encoded = dtypes.serialize_bytes(text)
    shm_in = grpcclient.InferInput("TEXT", [4], "BYTES")
    shm_in.set_shared_memory("r", len(encoded))
    raw = sample("INT32", (4,))
    msg = client_request([shm_in, client_input("IDS", raw, "INT32")])
    req = decode_infer_request(msg, FakeRegions(r=bytearray(encoded)))
    assert_same(req.inputs["TEXT"], text, "BYTES")
    assert_same(req.inputs["IDS"], raw, "INT32")


# --- request errors ---------------------------------------------------------------------------


def raw_request(datatype: str, shape: list[int], *raw: bytes, name: str = "IN") -> Any:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name=name, datatype=datatype, shape=shape)
    msg.raw_input_contents.extend(raw)
    return msg


def test_error_contents_and_raw_together() -> None:
    msg = typed_request("FP32", "fp32_contents", [1.0, 2.0, 3.0, 4.0])
    msg.raw_input_contents.append(b"\x00" * 16)
    with pytest.raises(InvalidArgument, match="input 'IN' carries typed contents but the request"):
        decode_infer_request(msg, None)


def test_error_too_few_raw_entries() -> None:
    msg = raw_request("FP32", [1], np.float32(1).tobytes())
    msg.inputs.add(name="SECOND", datatype="FP32", shape=[1])
    with pytest.raises(InvalidArgument, match="no data for input 'SECOND'"):
        decode_infer_request(msg, None)


def test_error_too_many_raw_entries() -> None:
    msg = raw_request("FP32", [1], b"\x00" * 4, b"\x00" * 4)
    with pytest.raises(InvalidArgument, match="2 raw_input_contents entries but only 1 inputs"):
        decode_infer_request(msg, None)


def test_error_raw_byte_size() -> None:
    msg = raw_request("FP32", [2, 3], b"\x00" * 20)
    with pytest.raises(
        InvalidArgument,
        match=r"input 'IN' \(FP32, shape \[2, 3\]\) needs 24 bytes but raw_input_contents\[0\]"
        r" holds 20",
    ):
        decode_infer_request(msg, None)


def test_error_typed_element_count() -> None:
    msg = typed_request("INT32", "int_contents", [1, 2, 3])
    with pytest.raises(
        InvalidArgument, match=r"needs 4 elements, but contents\.int_contents holds 3"
    ):
        decode_infer_request(msg, None)


def test_error_typed_contents_in_wrong_field() -> None:
    msg = typed_request("INT32", "fp32_contents", [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(InvalidArgument, match=r"in contents.fp32_contents; put them in contents."):
        decode_infer_request(msg, None)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_error_typed_contents_for_raw_only_types(datatype: str) -> None:
    msg = typed_request(datatype, "fp32_contents", [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(InvalidArgument, match=f"is {datatype}, which has no typed contents"):
        decode_infer_request(msg, None)


def test_error_unknown_datatype() -> None:
    with pytest.raises(InvalidArgument, match="unknown datatype 'FLOAT' for input 'IN'"):
        decode_infer_request(raw_request("FLOAT", [1], b"\x00" * 4), None)


def test_error_negative_dimension() -> None:
    with pytest.raises(InvalidArgument, match=r"shape \[-1, 2\] with a negative dimension"):
        decode_infer_request(raw_request("FP32", [-1, 2], b""), None)


def test_error_duplicate_input() -> None:
    msg = raw_request("INT8", [1], b"\x01", b"\x02")
    msg.inputs.add(name="IN", datatype="INT8", shape=[1])
    with pytest.raises(InvalidArgument, match="input 'IN' appears more than once"):
        decode_infer_request(msg, None)


@pytest.mark.parametrize(
    ("payload", "count", "message"),
    [
        (b"\x01\x00", 1, "the shape needs 1 elements but the data ends after 0"),
        (struct.pack("<I", 5) + b"abc", 1, "element 0 declares 5 bytes but only 3 remain"),
        (struct.pack("<I", 1) + b"a" + b"zz", 1, "2 bytes left over after the 1 elements"),
        (struct.pack("<I", 1) + b"a", 2, "the shape needs 2 elements but the data ends after 1"),
    ],
)
def test_error_malformed_bytes(payload: bytes, count: int, message: str) -> None:
    msg = raw_request("BYTES", [count], payload, name="TEXT")
    with pytest.raises(InvalidArgument, match=f"malformed BYTES data for input 'TEXT': {message}"):
        decode_infer_request(msg, None)


def test_error_shared_memory_with_contents() -> None:
    msg = typed_request("FP32", "fp32_contents", [1.0, 2.0, 3.0, 4.0])
    msg.inputs[0].parameters["shared_memory_region"].string_param = "r"
    msg.inputs[0].parameters["shared_memory_byte_size"].int64_param = 16
    with pytest.raises(InvalidArgument, match="names shared memory region 'r' and also carries"):
        decode_infer_request(msg, FakeRegions(r=bytearray(16)))


def test_error_shared_memory_without_reader() -> None:
    tensor = grpcclient.InferInput("IN", [1], "FP32")
    tensor.set_shared_memory("r", 4)
    with pytest.raises(Unsupported, match="input 'IN' uses shared memory"):
        decode_infer_request(client_request([tensor]), None)


def test_error_shared_memory_byte_size_mismatch() -> None:
    tensor = grpcclient.InferInput("IN", [2], "FP32")
    tensor.set_shared_memory("r", 4)
    with pytest.raises(InvalidArgument, match="needs 8 bytes but shared memory region 'r'"):
        decode_infer_request(client_request([tensor]), FakeRegions(r=bytearray(16)))


def test_error_shared_memory_params_incomplete() -> None:
    msg = raw_request("FP32", [1], b"\x00" * 4)
    msg.inputs[0].parameters["shared_memory_byte_size"].int64_param = 4
    with pytest.raises(InvalidArgument, match="has shared_memory_byte_size/shared_memory_offset"):
        decode_infer_request(msg, None)
    msg = raw_request("FP32", [1])
    msg.inputs[0].parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(InvalidArgument, match="has no shared_memory_byte_size"):
        decode_infer_request(msg, FakeRegions(r=bytearray(4)))


def test_error_output_shared_memory_and_classification() -> None:
    # tritonclient refuses to build this, so set the parameters directly
    msg = raw_request("INT8", [1], b"\x01")
    params = msg.outputs.add(name="OUT").parameters
    params["classification"].int64_param = 2
    params["shared_memory_region"].string_param = "r"
    params["shared_memory_byte_size"].int64_param = 64
    with pytest.raises(InvalidArgument, match="output 'OUT' asks for both shared_memory_region"):
        decode_infer_request(msg, None)


def test_error_parameter_types() -> None:
    msg = raw_request("INT8", [1], b"\x01")
    msg.parameters["priority"].string_param = "high"
    with pytest.raises(InvalidArgument, match="'priority' must be a non-negative int64_param"):
        decode_infer_request(msg, None)
    msg = raw_request("INT8", [1], b"\x01")
    msg.parameters["timeout"].int64_param = -5
    with pytest.raises(InvalidArgument, match="'timeout' \\(microseconds\\) must be a non-neg"):
        decode_infer_request(msg, None)


def test_error_duplicate_output() -> None:
    outs = [grpcclient.InferRequestedOutput("OUT"), grpcclient.InferRequestedOutput("OUT")]
    msg = client_request([client_input("IN", sample("FP32"), "FP32")], outs)
    with pytest.raises(InvalidArgument, match="output 'OUT' is requested more than once"):
        decode_infer_request(msg, None)
