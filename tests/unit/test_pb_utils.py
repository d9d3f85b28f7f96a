"""The Python backend's pb_utils module (triton_python_backend_utils): tensors, requests and
responses, the config and type helpers, and BLS calls through the gateway (also awaited from an
async execute). PythonRuntime driving a user's model.py: test_python_runtime.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protos.gen.inference import model_config_pb2 as mc
from services.core import gateway_client
from services.python import triton_python_backend_utils as pb_utils
from services.python.runtime import PythonRuntime
from tests.fake_gateway import serving_as_gateway
from tests.unit.python_backend_support import CPU, FakeGateway, _config, _write

# --- pb_utils -------------------------------------------------------------------------------


def test_tensor_wraps_numpy_without_copy() -> None:
    array = np.arange(4, dtype=np.float32)
    tensor = pb_utils.Tensor("X", array)
    assert tensor.name() == "X"
    assert tensor.as_numpy() is array
    assert tensor.is_cpu()
    back = pb_utils.Tensor.from_dlpack("Y", tensor.to_dlpack())
    np.testing.assert_array_equal(back.as_numpy(), array)
    with pytest.raises(pb_utils.TritonModelException, match="numpy array"):
        pb_utils.Tensor("X", [1, 2])  # type: ignore[arg-type]


def test_request_response_accessors() -> None:
    x = pb_utils.Tensor("X", np.zeros(2, dtype=np.float32))
    request = pb_utils.InferenceRequest(
        model_name="m",
        inputs=[x],
        requested_output_names=["Y"],
        request_id="7",
        parameters={"a": 1},
    )
    assert request.inputs() == [x]
    assert request.requested_output_names() == ["Y"]
    assert request.request_id() == "7"
    assert json.loads(request.parameters()) == {"a": 1}
    assert pb_utils.get_input_tensor_by_name(request, "X") is x
    assert pb_utils.get_input_tensor_by_name(request, "nope") is None
    response = pb_utils.InferenceResponse(output_tensors=[x])
    assert not response.has_error()
    assert pb_utils.get_output_tensor_by_name(response, "X") is x
    failed = pb_utils.InferenceResponse(error=pb_utils.TritonError("no"))
    assert failed.has_error()
    error = failed.error()
    assert error is not None and error.message() == "no"
    assert error.code() == pb_utils.TritonError.INTERNAL
    assert request.model_version() == -1 and request.timeout() == 0


def test_config_and_type_helpers() -> None:
    config = {"input": [{"name": "A", "data_type": "TYPE_INT8"}], "output": [{"name": "B"}]}
    assert pb_utils.get_input_config_by_name(config, "A") == config["input"][0]
    assert pb_utils.get_output_config_by_name(config, "B") == {"name": "B"}
    assert pb_utils.get_output_config_by_name(config, "A") is None
    assert pb_utils.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb_utils.triton_string_to_numpy("TYPE_NOPE") is None
    assert pb_utils.numpy_to_triton_type(np.float32) == pb_utils.TYPE_FP32 == mc.TYPE_FP32
    assert pb_utils.numpy_to_triton_type(np.object_) == mc.TYPE_STRING
    assert pb_utils.triton_to_numpy_type(mc.TYPE_INT64) is np.int64
    assert not pb_utils.using_decoupled_model_transaction_policy(config)


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGateway]:
    fake = FakeGateway()
    with serving_as_gateway(fake, monkeypatch):
        yield fake


def _simple_request(model: str = "simple", **kwargs: Any) -> pb_utils.InferenceRequest:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    tensors = [pb_utils.Tensor("INPUT0", a), pb_utils.Tensor("INPUT1", np.ones_like(a))]
    return pb_utils.InferenceRequest(model, tensors, ["OUTPUT0"], **kwargs)


def test_bls_exec_calls_the_gateway(gateway: FakeGateway) -> None:
    response = _simple_request(model_version=2, parameters={"k": 1, "flag": True}).exec()
    out = pb_utils.get_output_tensor_by_name(response, "OUTPUT0")
    assert out is not None
    np.testing.assert_array_equal(out.as_numpy(), np.arange(1, 17, dtype=np.int32)[None])
    (sent,) = gateway.requests
    assert (sent.model_name, sent.model_version) == ("simple", "2")
    assert [o.name for o in sent.outputs] == ["OUTPUT0"]
    assert sent.parameters["k"].int64_param == 1 and sent.parameters["flag"].bool_param


NUMERIC = ["?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"]


@pytest.mark.parametrize(
    "array",
    [np.arange(6).astype(t).reshape(2, 3) for t in NUMERIC]
    + [np.array([b"a", b"", "\u00e9".encode()], dtype=object)],
)
def test_bls_datatypes_travel_raw(gateway: FakeGateway, array: np.ndarray) -> None:
    request = pb_utils.InferenceRequest("echo", [pb_utils.Tensor("X", array)], ["X"])
    out = pb_utils.get_output_tensor_by_name(request.exec(), "X")
    assert out is not None and out.as_numpy().dtype == array.dtype
    np.testing.assert_array_equal(out.as_numpy(), array)
    assert not gateway.requests[0].inputs[0].HasField("contents")


def test_bls_errors_returned(gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    response = _simple_request("nope").exec()
    error = response.error()
    assert response.has_error() and error is not None
    assert error.code() == pb_utils.TritonError.NOT_FOUND
    assert "unknown model: 'nope'" in error.message()
    bad = pb_utils.InferenceRequest("echo", [pb_utils.Tensor("X", np.zeros(2, "c8"))], ["X"])
    assert "complex64" in str(bad.exec().error())
    monkeypatch.setenv(gateway_client.GATEWAY_ENV, "127.0.0.1:1")
    down = _simple_request(timeout=2_000_000).exec().error()
    assert down is not None and down.code() == pb_utils.TritonError.UNAVAILABLE


def test_bls_async_exec(gateway: FakeGateway) -> None:
    async def both() -> list[pb_utils.InferenceResponse]:
        requests = [_simple_request(), _simple_request("x")]
        return list(await asyncio.gather(*(r.async_exec() for r in requests)))

    ok, failed = asyncio.run(both())
    assert not ok.has_error() and failed.has_error()
    assert len(gateway.requests) == 2


def test_async_execute_awaits_bls(gateway: FakeGateway, tmp_path: Path) -> None:
    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        async def execute(self, requests):
            x = pb_utils.get_input_tensor_by_name(requests[0], "X")
            reply = await pb_utils.InferenceRequest("echo", [x], ["X"]).async_exec()
            y = pb_utils.get_output_tensor_by_name(reply, "X").as_numpy() * 2
            return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)])]
    """
    runtime = PythonRuntime(_config(), _write(tmp_path, model), CPU)
    out = runtime.infer({"X": np.ones((1, 2), np.float32)}, ["Y"])
    np.testing.assert_array_equal(out["Y"], np.full((1, 2), 2, np.float32))
    assert gateway.requests[0].model_name == "echo"
