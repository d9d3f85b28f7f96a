"""The real PyTorch service (TorchRuntime on the serving kit) through tritonclient gRPC and HTTP:
infer, metadata, config, batching, statistics, the kit's bad-input errors, and the stateful
``simple_sequence_torch`` under the sequence batcher."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from examples.build_torch import build_torch_repository, cnn_module, mlp_module  # noqa: E402
from services.torch.runtime import TorchRuntime  # noqa: E402
from tests.sequence_checks import check_interleaved_sums, check_user_tensors_only  # noqa: E402
from tests.support import ServerThread, batched_counts, settings_for  # noqa: E402


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root: Path = tmp_path_factory.mktemp("torch_models")
    build_torch_repository(root)
    with ServerThread(settings_for(root), [TorchRuntime]) as server:
        yield server


@pytest.fixture
def client(torch_server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(torch_server.grpc_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def http(torch_server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(torch_server.http_url)
    try:
        yield c
    finally:
        c.close()


def tensor(mod: Any, name: str, array: np.ndarray, datatype: str) -> Any:
    t = mod.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def simple_inputs(a: np.ndarray, b: np.ndarray, mod: Any = grpcclient) -> list[Any]:
    return [tensor(mod, "INPUT__0", a, "INT32"), tensor(mod, "INPUT__1", b, "INT32")]


def eager(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        result: np.ndarray = module(torch.from_numpy(x)).numpy()
    return result


def test_all_models_ready(client: grpcclient.InferenceServerClient) -> None:
    for name in (
        "simple_torch",
        "mlp_torch",
        "cnn_torch",
        "mlp_torch_export",
        "simple_sequence_torch",
    ):
        assert client.is_model_ready(name), name


@pytest.mark.parametrize("mod", [grpcclient, httpclient])
def test_simple_torch(torch_server: ServerThread, mod: Any, client: Any, http: Any) -> None:
    c = client if mod is grpcclient else http
    rng = np.random.default_rng(1)
    a = rng.integers(-100, 100, (2, 16), dtype=np.int32)
    b = rng.integers(-100, 100, (2, 16), dtype=np.int32)
    result = c.infer("simple_torch", simple_inputs(a, b, mod))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), a - b)


@pytest.mark.parametrize("name", ["mlp_torch", "mlp_torch_export"])
@pytest.mark.parametrize("mod", [grpcclient, httpclient])
def test_mlp_models_match_eager(name: str, mod: Any, client: Any, http: Any) -> None:
    c = client if mod is grpcclient else http
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    result = c.infer(name, [tensor(mod, "INPUT__0", x, "FP32")])
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), eager(mlp_module(), x), atol=1e-5)


def test_cnn_matches_eager_and_classifies(client: grpcclient.InferenceServerClient) -> None:
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    inp = tensor(grpcclient, "INPUT__0", x, "FP32")
    result = client.infer("cnn_torch", [inp])
    expected = eager(cnn_module(), x)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected, atol=1e-4)
    top = client.infer(
        "cnn_torch", [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT__0", class_count=1)]
    ).as_numpy("OUTPUT__0")
    assert top is not None
    assert top.reshape(-1)[0].decode().split(":")[1] == str(int(expected[0].argmax()))


def test_metadata_and_config(
    client: grpcclient.InferenceServerClient, http: httpclient.InferenceServerClient
) -> None:
    meta = client.get_model_metadata("simple_torch", as_json=True)
    assert meta["platform"] == "pytorch_libtorch"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT__0", "INT32", ["-1", "16"]),
        ("INPUT__1", "INT32", ["-1", "16"]),
    ]
    config = client.get_model_config("mlp_torch_export", as_json=True)["config"]
    assert config["backend"] == "pytorch"
    assert config["default_model_filename"] == "model.pt2"
    assert int(config["max_batch_size"]) == 64
    http_meta = http.get_model_metadata("mlp_torch")
    assert http_meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.parametrize("name", ["mlp_torch", "mlp_torch_export"])
def test_concurrent_requests_are_batched(
    client: grpcclient.InferenceServerClient, torch_server: ServerThread, name: str
) -> None:
    x = np.random.default_rng(4).standard_normal((1, 256)).astype(np.float32)
    expected = eager(mlp_module(), x)
    inp = tensor(grpcclient, "INPUT__0", x, "FP32")

    def one_call(c: grpcclient.InferenceServerClient) -> None:
        out = c.infer(name, [inp]).as_numpy("OUTPUT__0")
        np.testing.assert_allclose(out, expected, atol=1e-5)

    inferences, executions = batched_counts(torch_server.grpc_url, name, one_call)
    assert inferences == 16 * 8
    assert executions < inferences


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        (
            lambda: [
                tensor(grpcclient, "INPUT__0", np.zeros((1, 16), np.float32), "FP32"),
                tensor(grpcclient, "INPUT__1", np.zeros((1, 16), np.int32), "INT32"),
            ],
            "INPUT__0",
        ),
        (
            lambda: simple_inputs(np.zeros((1, 15), np.int32), np.zeros((1, 15), np.int32)),
            "INPUT__0",
        ),
        (lambda: simple_inputs(np.zeros((9, 16), np.int32), np.zeros((9, 16), np.int32)), "batch"),
        (
            lambda: simple_inputs(np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32))[:1],
            "INPUT__1",
        ),
    ],
    ids=["wrong dtype", "wrong shape", "batch too big", "missing input"],
)
def test_bad_input_gets_the_kits_errors(
    client: grpcclient.InferenceServerClient, inputs: Any, fragment: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple_torch", inputs())
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert fragment in str(info.value)
    a = np.ones((1, 16), np.int32)
    ok = client.infer("simple_torch", simple_inputs(a, a))
    np.testing.assert_array_equal(ok.as_numpy("OUTPUT__0"), a * 2)


def test_http_wrong_dtype_is_400(http: httpclient.InferenceServerClient) -> None:
    inputs = [
        tensor(httpclient, "INPUT__0", np.zeros((1, 16), np.float32), "FP32"),
        tensor(httpclient, "INPUT__1", np.zeros((1, 16), np.int32), "INT32"),
    ]
    with pytest.raises(InferenceServerException) as info:
        http.infer("simple_torch", inputs)
    assert "400" in str(info.value.status()) or "INPUT__0" in str(info.value)


def test_interleaved_sequences_keep_their_running_sums(
    client: grpcclient.InferenceServerClient,
) -> None:
    check_interleaved_sums(client, "simple_sequence_torch", ("INPUT__0", "OUTPUT__0"))


def test_sequence_metadata_lists_only_the_users_tensors(
    client: grpcclient.InferenceServerClient,
) -> None:
    check_user_tensors_only(
        client, "simple_sequence_torch", ("INPUT__0", "OUTPUT__0"), ["START__1", "READY__2"]
    )
