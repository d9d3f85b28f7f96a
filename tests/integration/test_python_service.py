"""The Python service end to end: Triton model.py files served on the kit, called by tritonclient."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from examples.build_python import build_python_repository
from services.core.runtime import Runtime
from services.python.runtime import PythonRuntime
from tests.fake_gateway import serving_as_gateway
from tests.support import ServerThread, settings_for
from tests.unit.python_backend_support import FakeGateway


@pytest.fixture(scope="module")
def python_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root: Path = tmp_path_factory.mktemp("python_models")
    build_python_repository(root)
    with ServerThread(settings_for(root), [PythonRuntime]) as server:
        yield server


def _add_sub_inputs(module: object, a: np.ndarray, b: np.ndarray) -> list[object]:
    make = module.InferInput  # type: ignore[attr-defined]
    inputs = [make("INPUT0", [4], "FP32"), make("INPUT1", [4], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def test_add_sub_over_grpc_and_http(python_server: ServerThread) -> None:
    a = np.array([1.5, 2, 3, 4], np.float32)
    b = np.array([0.5, 1, 1, 1], np.float32)
    with grpcclient.InferenceServerClient(python_server.grpc_url) as client:
        assert client.is_model_ready("add_sub_python")
        result = client.infer("add_sub_python", _add_sub_inputs(grpcclient, a, b))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    http = httpclient.InferenceServerClient(python_server.http_url)
    try:
        result = http.infer(
            "add_sub_python",
            _add_sub_inputs(httpclient, a, b),
            outputs=[httpclient.InferRequestedOutput("OUTPUT1")],
        )
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    finally:
        http.close()


def test_identity_bytes(python_server: ServerThread) -> None:
    data = np.array([[b"hello", b"\x00\xffraw", b"text"]], dtype=object)
    inp = grpcclient.InferInput("INPUT0", [1, 3], "BYTES")
    inp.set_data_from_numpy(data)
    with grpcclient.InferenceServerClient(python_server.grpc_url) as client:
        result = client.infer("identity_python", [inp])
    assert result.as_numpy("OUTPUT0").tolist() == data.tolist()


def test_execute_error_text_reaches_client_and_service_keeps_serving(
    python_server: ServerThread,
) -> None:
    inp = grpcclient.InferInput("INPUT0", [4], "FP32")
    inp.set_data_from_numpy(np.zeros(4, np.float32))
    with grpcclient.InferenceServerClient(python_server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer("failing_python", [inp])
        assert info.value.status() == "StatusCode.INTERNAL"
        assert "boom" in info.value.message()
        assert "ValueError" in info.value.message()
        assert client.is_model_ready("failing_python")
        a = np.ones(4, np.float32)
        result = client.infer("add_sub_python", _add_sub_inputs(grpcclient, a, a))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)


def test_bad_initialize_is_unavailable_with_reason(python_server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(python_server.grpc_url) as client:
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["bad_init_python"]["state"] == "UNAVAILABLE"
        assert "weights file missing" in index["bad_init_python"]["reason"]
        assert index["add_sub_python"]["state"] == "READY"
        assert not client.is_model_ready("bad_init_python")
        inp = grpcclient.InferInput("INPUT0", [4], "FP32")
        inp.set_data_from_numpy(np.zeros(4, np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("bad_init_python", [inp])
        assert info.value.status() == "StatusCode.UNAVAILABLE"


def test_concurrent_requests_each_get_their_own_answer(python_server: ServerThread) -> None:
    def one(i: int) -> tuple[int, list[bytes]]:
        data = np.array([[f"req-{i}-{j}".encode() for j in range(i % 3 + 1)]], dtype=object)
        inp = grpcclient.InferInput("INPUT0", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        with grpcclient.InferenceServerClient(python_server.grpc_url) as client:
            out = client.infer("identity_python", [inp]).as_numpy("OUTPUT0")
        return i, [bytes(x) for x in out.reshape(-1)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    for i, values in results:
        assert values == [f"req-{i}-{j}".encode() for j in range(i % 3 + 1)]


def test_model_config_served_as_written(python_server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(python_server.grpc_url) as client:
        config = client.get_model_config("add_sub_python", as_json=True)["config"]
    assert config["backend"] == "python"
    assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"]


PER_REQUEST_CONFIG = """
name: "per_request"
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { max_queue_delay_microseconds: 200000 }
"""

PER_REQUEST_MODEL = """
import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            if json.loads(request.parameters()).get("fail"):
                error = pb_utils.TritonError("rejected by the model", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            size = len(requests)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x * 0 + size)]))
        return responses
"""


@pytest.mark.skipif(
    not hasattr(Runtime, "infer_requests"),
    reason="needs the kit to hand request lists to runtimes (services/core/model.py)",
)
def test_batched_requests_reach_execute_apart(tmp_path: Path) -> None:
    model_dir = tmp_path / "per_request"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(PER_REQUEST_CONFIG)
    (model_dir / "1" / "model.py").write_text(PER_REQUEST_MODEL)
    with ServerThread(settings_for(tmp_path), [PythonRuntime]) as server:

        def one(i: int) -> float | str:
            inp = grpcclient.InferInput("X", [1, 2], "FP32")
            inp.set_data_from_numpy(np.zeros((1, 2), np.float32))
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                try:
                    out = client.infer("per_request", [inp], parameters={"fail": i % 2 == 1})
                except InferenceServerException as exc:
                    return f"{exc.status()}: {exc.message()}"
                return float(out.as_numpy("Y")[0, 0])

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, range(6)))
    for i, result in enumerate(results):
        if i % 2:
            assert result == "StatusCode.INVALID_ARGUMENT: rejected by the model"
        else:
            assert isinstance(result, float) and result > 1  # batched with others, yet apart


@pytest.fixture
def fake_gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGateway]:
    """A gRPC server on port 0 answering ModelInfer for ``simple`` in place of the mesh."""
    fake = FakeGateway()
    with serving_as_gateway(fake, monkeypatch, workers=2):
        yield fake


def test_bls_model_calls_through_the_gateway(
    python_server: ServerThread, fake_gateway: FakeGateway
) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    inputs = [grpcclient.InferInput(n, [2, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for item in inputs:
        item.set_data_from_numpy(a)
    with grpcclient.InferenceServerClient(python_server.grpc_url) as client:
        result = client.infer("bls_python", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 4 * a)
        with pytest.raises(InferenceServerException, match="unknown model: 'gone'"):
            client.infer("bls_python", inputs, parameters={"bls_model": "gone"})
    assert [r.model_name for r in fake_gateway.requests] == ["simple", "gone"]


AUTO_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        for name in ("INPUT0", "INPUT1"):
            auto_complete_model_config.add_input(
                {"name": name, "data_type": "TYPE_FP32", "dims": [4]}
            )
        auto_complete_model_config.add_output(
            {"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}
        )
        auto_complete_model_config.set_max_batch_size(4)
        auto_complete_model_config.set_dynamic_batching()
        return auto_complete_model_config

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (a + b).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""


def test_a_model_without_config_file_completes_its_own(tmp_path: Path) -> None:
    # Triton's auto_complete_config: no config.pbtxt at all for one model; another whose
    # config.pbtxt asks for a larger batch than the model allows fails alone, with the reason
    for name, config in (("auto", None), ("auto_too_big", "max_batch_size: 8")):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.py").write_text(AUTO_MODEL)
        if config is not None:
            (tmp_path / name / "config.pbtxt").write_text(f'backend: "python"\n{config}\n')
    with (
        ServerThread(settings_for(tmp_path), [PythonRuntime]) as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        config = client.get_model_config("auto", as_json=True)["config"]
        assert config["max_batch_size"] == 4 and "dynamic_batching" in config
        assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"]
        a = np.ones((2, 4), np.float32)
        inputs = [grpcclient.InferInput(n, [2, 4], "FP32") for n in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(a)
        result = client.infer("auto", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["auto_too_big"]["state"] == "UNAVAILABLE"
        assert "max_batch_size 8, more than the 4" in index["auto_too_big"]["reason"]
