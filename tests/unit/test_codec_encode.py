"""Encoding responses that stock tritonclient reads back (InferResult.as_numpy), and dtypes."""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from services.core import dtypes
from services.core.codec import encode_infer_response
from services.core.requests import Array, InferResponse, OutputTensor, SharedMemoryRef
from tests.unit.tensor_samples import ALL, sample

# --- responses --------------------------------------------------------------------------------


def server_data(datatype: str, client: Array) -> Array:
    """What a runtime would hand back for ``client``'s values (BF16 as V2 raw bits)."""
    if datatype == "BF16":
        return client.view(np.uint16).view(dtypes.BF16_DTYPE)
    return client


@pytest.mark.parametrize("datatype", ALL)
def test_response_read_by_tritonclient_every_datatype(datatype: str) -> None:
    client = sample(datatype, (2, 5))
    resp = InferResponse(
        model_name="m",
        model_version="1",
        id="abc",
        outputs=[OutputTensor("OUT", datatype, server_data(datatype, client))],
    )
    msg = encode_infer_response(resp)
    result = grpcclient.InferResult(msg)
    read = result.as_numpy("OUT")
    assert read.shape == (2, 5)
    if datatype == "BF16":
        assert read.dtype == ml_dtypes.bfloat16
        assert np.array_equal(read.view(np.uint16), client.view(np.uint16))
    elif datatype == "BYTES":
        assert read.tolist() == client.tolist()
    else:
        assert np.array_equal(read, client)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "abc")
    assert response.outputs[0].datatype == datatype


def test_response_shared_memory_output_keeps_index_alignment() -> None:
    shm_data = np.arange(4, dtype=np.float32)
    after = np.array([[1, 2, 3]], dtype=np.int64)
    resp = InferResponse(
        model_name="m",
        model_version="1",
        id="",
        outputs=[
            OutputTensor("SHM", "FP32", shm_data, shared_memory=SharedMemoryRef("r", 16, 32)),
            OutputTensor("AFTER", "INT64", after),
        ],
    )
    msg = encode_infer_response(resp)
    assert list(msg.raw_output_contents) == [b"", after.tobytes()]
    params = msg.outputs[0].parameters
    assert params["shared_memory_region"].string_param == "r"
    assert params["shared_memory_offset"].int64_param == 32
    assert params["shared_memory_byte_size"].int64_param == 16
    assert list(msg.outputs[0].shape) == [4]
    result = grpcclient.InferResult(msg)
    assert np.array_equal(result.as_numpy("AFTER"), after)
    assert result.get_output("SHM").datatype == "FP32"


def test_response_parameters_and_dtype_coercion() -> None:
    resp = InferResponse(
        model_name="m",
        model_version="1",
        id="",
        outputs=[
            OutputTensor("F", "FP32", np.array([1.5, 2.5], dtype=np.float64)),
            OutputTensor("T", "FP32", np.arange(6, dtype=np.float32).reshape(2, 3).T),
            OutputTensor("B", "BF16", np.array([1.0, -2.0, np.nan], dtype=np.float32)),
        ],
        parameters={"flag": True, "n": -3, "big": 2**63, "x": 0.25, "s": "v"},
    )
    msg = encode_infer_response(resp)
    result = grpcclient.InferResult(msg)
    assert result.as_numpy("F").tolist() == [1.5, 2.5]
    assert result.as_numpy("T").tolist() == [[0, 3], [1, 4], [2, 5]]
    bf16 = result.as_numpy("B").astype(np.float32)
    assert bf16[:2].tolist() == [1.0, -2.0] and np.isnan(bf16[2])
    kinds = {k: v.WhichOneof("parameter_choice") for k, v in msg.parameters.items()}
    assert kinds == {
        "flag": "bool_param",
        "n": "int64_param",
        "big": "uint64_param",
        "x": "double_param",
        "s": "string_param",
    }


# --- dtypes -----------------------------------------------------------------------------------


def test_dtype_tables_agree() -> None:
    for name in ALL:
        kind = dtypes.BY_NAME[name]
        assert dtypes.triton_from_config(kind.config) == name
        assert dtypes.numpy_from_config(kind.config) == kind.numpy
        assert dtypes.name_of_numpy(kind.numpy) == name
    assert dtypes.expected_byte_size("FP64", [2, 3]) == 48
    assert dtypes.expected_byte_size("BF16", [5]) == 10
    assert dtypes.expected_byte_size("BYTES", [5]) is None
    assert dtypes.name_of_numpy(np.dtype("S3")) == "BYTES"
    with pytest.raises(ValueError, match="data_type 0 has no Triton datatype"):
        dtypes.from_config(0)


def test_serialize_bytes_accepts_str_and_fixed_width_arrays() -> None:
    expected = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 2) + "é".encode()
    assert dtypes.serialize_bytes(np.array(["ab", "é"], dtype=object)) == expected
    assert dtypes.serialize_bytes(np.array(["ab", "é"])) == expected
    assert dtypes.serialize_bytes(np.array([b"ab", "é".encode()])) == expected
    back = dtypes.deserialize_bytes(memoryview(expected), 2, "test")
    assert back.tolist() == [b"ab", "é".encode()]
