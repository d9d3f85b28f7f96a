"""The real TensorFlow service (TensorflowRuntime on the serving kit) through tritonclient gRPC and
HTTP: infer, metadata, auto-completed config, batching, the kit's bad-input errors, and the
stateful ``simple_sequence_tf`` under the sequence batcher."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from examples.build_tensorflow import build_tensorflow_repository, mlp_reference  # noqa: E402
from services.tensorflow.graphdef import TensorflowGraphdefRuntime  # noqa: E402
from services.tensorflow.runtime import TensorflowRuntime  # noqa: E402
from tests.sequence_checks import check_interleaved_sums, check_user_tensors_only  # noqa: E402
from tests.support import ServerThread, batched_counts, settings_for  # noqa: E402


@pytest.fixture(scope="module")
def tf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root: Path = tmp_path_factory.mktemp("tensorflow_models")
    build_tensorflow_repository(root)
    runtimes = [TensorflowRuntime, TensorflowGraphdefRuntime]
    with ServerThread(settings_for(root), runtimes) as server:
        yield server


@pytest.fixture
def client(tf_server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(tf_server.grpc_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def http(tf_server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(tf_server.http_url)
    try:
        yield c
    finally:
        c.close()


def tensor(mod: Any, name: str, array: np.ndarray, datatype: str) -> Any:
    t = mod.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def simple_inputs(a: np.ndarray, b: np.ndarray, mod: Any = grpcclient) -> list[Any]:
    return [tensor(mod, "INPUT0", a, "INT32"), tensor(mod, "INPUT1", b, "INT32")]


def test_all_models_ready(client: grpcclient.InferenceServerClient) -> None:
    for name in ("simple_tf", "mlp_tf", "simple_tf_auto", "simple_sequence_tf"):
        assert client.is_model_ready(name), name


@pytest.mark.parametrize("name", ["simple_tf", "simple_tf_auto"])
@pytest.mark.parametrize("mod", [grpcclient, httpclient])
def test_simple_tf(name: str, mod: Any, client: Any, http: Any) -> None:
    c = client if mod is grpcclient else http
    rng = np.random.default_rng(1)
    a = rng.integers(-100, 100, (2, 16), dtype=np.int32)
    b = rng.integers(-100, 100, (2, 16), dtype=np.int32)
    result = c.infer(name, simple_inputs(a, b, mod))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("mod", [grpcclient, httpclient])
def test_mlp_matches_reference(mod: Any, client: Any, http: Any) -> None:
    c = client if mod is grpcclient else http
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    result = c.infer("mlp_tf", [tensor(mod, "INPUT0", x, "FP32")])
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), mlp_reference(x), atol=1e-4)


def test_metadata_and_config(
    client: grpcclient.InferenceServerClient, http: httpclient.InferenceServerClient
) -> None:
    meta = client.get_model_metadata("simple_tf", as_json=True)
    assert meta["platform"] == "tensorflow_savedmodel"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "INT32", ["-1", "16"]),
        ("INPUT1", "INT32", ["-1", "16"]),
    ]
    http_meta = http.get_model_metadata("mlp_tf")
    assert http_meta["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 10]}]
    config = client.get_model_config("mlp_tf", as_json=True)["config"]
    assert config["backend"] == "tensorflow"
    assert int(config["max_batch_size"]) == 64


def test_config_without_pbtxt_is_auto_completed(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("simple_tf_auto", as_json=True)["config"]
    assert config["platform"] == "tensorflow_savedmodel"
    assert config["backend"] == "tensorflow"
    assert int(config["max_batch_size"]) == 4
    assert "dynamic_batching" in config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("INPUT0", "TYPE_INT32", ["16"]),
        ("INPUT1", "TYPE_INT32", ["16"]),
    ]
    assert [t["name"] for t in config["output"]] == ["OUTPUT0", "OUTPUT1"]


def test_concurrent_requests_are_batched(
    client: grpcclient.InferenceServerClient, tf_server: ServerThread
) -> None:
    x = np.random.default_rng(4).standard_normal((1, 256)).astype(np.float32)
    expected = mlp_reference(x)
    inp = tensor(grpcclient, "INPUT0", x, "FP32")

    def one_call(c: grpcclient.InferenceServerClient) -> None:
        out = c.infer("mlp_tf", [inp]).as_numpy("OUTPUT0")
        np.testing.assert_allclose(out, expected, atol=1e-4)

    inferences, executions = batched_counts(tf_server.grpc_url, "mlp_tf", one_call)
    assert inferences == 16 * 8
    assert executions < inferences


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        (
            lambda: [
                tensor(grpcclient, "INPUT0", np.zeros((1, 16), np.float32), "FP32"),
                tensor(grpcclient, "INPUT1", np.zeros((1, 16), np.int32), "INT32"),
            ],
            "INPUT0",
        ),
        (
            lambda: simple_inputs(np.zeros((1, 15), np.int32), np.zeros((1, 15), np.int32)),
            "INPUT0",
        ),
        (lambda: simple_inputs(np.zeros((9, 16), np.int32), np.zeros((9, 16), np.int32)), "batch"),
        (
            lambda: simple_inputs(np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32))[:1],
            "INPUT1",
        ),
    ],
    ids=["wrong dtype", "wrong shape", "batch too big", "missing input"],
)
def test_bad_input_gets_the_kits_errors(
    client: grpcclient.InferenceServerClient, inputs: Any, fragment: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple_tf", inputs())
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert fragment in str(info.value)
    a = np.ones((1, 16), np.int32)
    ok = client.infer("simple_tf", simple_inputs(a, a))
    np.testing.assert_array_equal(ok.as_numpy("OUTPUT0"), a * 2)


def test_unknown_output_is_rejected(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), np.int32)
    with pytest.raises(InferenceServerException) as info:
        client.infer(
            "simple_tf", simple_inputs(a, a), outputs=[grpcclient.InferRequestedOutput("NOPE")]
        )
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "NOPE" in str(info.value)


def test_frozen_graphdef_served_beside_savedmodels(
    client: grpcclient.InferenceServerClient, http: httpclient.InferenceServerClient
) -> None:
    assert client.get_model_metadata("simple_tf_graphdef").platform == "tensorflow_graphdef"
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 5, dtype=np.int32)
    result = client.infer("simple_tf_graphdef", simple_inputs(a, b))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    result = http.infer("simple_tf_graphdef", simple_inputs(a, b, httpclient))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_interleaved_sequences_keep_their_running_sums(
    client: grpcclient.InferenceServerClient,
) -> None:
    check_interleaved_sums(client, "simple_sequence_tf", ("INPUT", "OUTPUT"))


def test_sequence_metadata_lists_only_the_users_tensors(
    client: grpcclient.InferenceServerClient,
) -> None:
    check_user_tensors_only(client, "simple_sequence_tf", ("INPUT", "OUTPUT"), ["START", "READY"])
