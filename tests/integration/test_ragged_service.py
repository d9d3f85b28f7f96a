"""Ragged batching on the real ONNX service (example ``simple_ragged``, services/core/ragged.py):
requests whose INPUT lengths differ are batched together, each gets its own SUM / MEAN per item
and SCALED in its own shape, over gRPC and HTTP; bad ragged configs are refused with their
reason while the other models serve, and a model whose scattered output does not fit fails only
its batch."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from examples.build_repository import build_repository
from examples.cli import write_if_changed
from services.core.runtime import Runtime
from services.onnx.runtime import OnnxRuntime
from tests.support import ServerThread, batched_counts, settings_for

MODEL = "simple_ragged"


def with_name(config: str, name: str) -> str:
    return config.replace(f'name: "{MODEL}"', f'name: "{name}"', 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("ragged_models")
    build_repository(root, [MODEL])
    config = (root / MODEL / "config.pbtxt").read_text()
    onnx_bytes = (root / MODEL / "1" / "model.onnx").read_bytes()
    # SUM (one value per item) also scattered by INPUT's shape: fits only items of length 1
    misfit = (
        with_name(config, "ragged_misfit")
        .replace(
            'name: "SUM" data_type: TYPE_FP32 dims: [ 1 ]',
            'name: "SUM" data_type: TYPE_FP32 dims: [ -1 ]',
        )
        .replace('target_name: "SCALED"', 'target_name: [ "SCALED", "SUM" ]')
    )
    assert '"SUM" data_type: TYPE_FP32 dims: [ -1 ]' in misfit and '"SCALED", "SUM"' in misfit
    # LENGTHS declared by the user as well: refused at load
    doubled = with_name(config, "ragged_doubled").replace(
        "input [ {", 'input [ { name: "LENGTHS" data_type: TYPE_INT32 dims: [ 1 ] }, {', 1
    )
    for name, text in (("ragged_misfit", misfit), ("ragged_doubled", doubled)):
        write_if_changed(root / name / "config.pbtxt", text.encode())
        write_if_changed(root / name / "1" / "model.onnx", onnx_bytes)
    with ServerThread(settings_for(root), [OnnxRuntime]) as srv:
        yield srv


def grpc_call(
    client: grpcclient.InferenceServerClient, x: np.ndarray, model: str = MODEL
) -> dict[str, np.ndarray]:
    tensor = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor])
    return {n: result.as_numpy(n) for n in ("SUM", "MEAN", "SCALED")}


def check(x: np.ndarray, out: dict[str, np.ndarray]) -> None:
    assert out["SCALED"].shape == x.shape
    np.testing.assert_allclose(out["SCALED"], 2 * x)
    np.testing.assert_allclose(out["SUM"], x.sum(axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(out["MEAN"], x.mean(axis=1, keepdims=True), rtol=1e-5)


def test_requests_of_different_lengths_share_batches(server: ServerThread) -> None:
    rng = random.Random(5)

    def one_call(client: grpcclient.InferenceServerClient) -> None:
        batch, length = rng.randint(1, 3), rng.randint(1, 40)
        x = np.random.default_rng(length).random((batch, length), dtype=np.float32)
        check(x, grpc_call(client, x))

    inferences, executions = batched_counts(server.grpc_url, MODEL, one_call, threads=8)
    assert inferences >= 64
    # 64 requests of random lengths: without ragged batching nearly each runs alone
    assert executions <= 48, f"{executions} executions for 64 requests: ragged ones did not batch"
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert any(int(b["batch_size"]) > 3 for b in stats["batch_stats"])


def test_over_http_with_json_and_binary_data(server: ServerThread) -> None:
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    with httpclient.InferenceServerClient(server.http_url.removeprefix("http://")) as client:
        for binary in (False, True):
            tensor = httpclient.InferInput("INPUT", [2, 5], "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            outputs = [
                httpclient.InferRequestedOutput(n, binary_data=binary)
                for n in ("SUM", "MEAN", "SCALED")
            ]
            result = client.infer(MODEL, [tensor], outputs=outputs)
            check(x, {n: result.as_numpy(n) for n in ("SUM", "MEAN", "SCALED")})


def test_clients_cannot_send_batch_inputs_and_ragged_dims_still_hold(server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        x = grpcclient.InferInput("INPUT", [1, 3], "FP32")
        x.set_data_from_numpy(np.ones((1, 3), np.float32))
        lengths = grpcclient.InferInput("LENGTHS", [1], "INT32")
        lengths.set_data_from_numpy(np.array([3], np.int32))
        with pytest.raises(InferenceServerException, match="unexpected input 'LENGTHS'") as err:
            client.infer(MODEL, [x, lengths])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        cube = grpcclient.InferInput("INPUT", [1, 2, 2], "FP32")
        cube.set_data_from_numpy(np.ones((1, 2, 2), np.float32))
        with pytest.raises(InferenceServerException, match="unexpected shape for input 'INPUT'"):
            client.infer(MODEL, [cube])
        check(np.ones((1, 3), np.float32), grpc_call(client, np.ones((1, 3), np.float32)))


def test_bad_ragged_configs_are_refused_and_misfits_fail_their_batch(server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index["ragged_doubled"]["state"] == "UNAVAILABLE"
        assert (
            "target_name ['LENGTHS'] is also declared in 'input'"
            in index["ragged_doubled"]["reason"]
        )
        assert index["ragged_misfit"]["state"] == "READY"
        ones = np.ones((1, 1), np.float32)
        assert grpc_call(client, ones, "ragged_misfit")["SUM"].shape == (1, 1)  # length 1 fits
        with pytest.raises(
            InferenceServerException, match="'SUM' has 1 elements; scattered"
        ) as err:
            grpc_call(client, np.ones((1, 4), np.float32), "ragged_misfit")
        assert err.value.status() == "StatusCode.INTERNAL"
        check(np.ones((1, 4), np.float32), grpc_call(client, np.ones((1, 4), np.float32)))


def drive_family(
    root: Path, runtime: type[Runtime], model: str, names: tuple[str, str, str, str], batch: int
) -> None:
    """Serve ``root`` with ``runtime``; 64 requests of random lengths (batch 1..``batch``) from
    8 threads get their sums and scaled values, in fewer executions than requests."""
    values, _, sums, scaled = names
    with ServerThread(settings_for(root), [runtime]) as srv:
        rng = random.Random(9)

        def one_call(client: grpcclient.InferenceServerClient) -> None:
            size, length = rng.randint(1, batch), rng.randint(1, 30)
            x = np.random.default_rng(length).random((size, length), dtype=np.float32)
            tensor = grpcclient.InferInput(values, [size, length], "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer(model, [tensor])
            np.testing.assert_allclose(result.as_numpy(sums), x.sum(1, keepdims=True), rtol=1e-5)
            np.testing.assert_allclose(result.as_numpy(scaled), 2 * x)

        _, executions = batched_counts(srv.grpc_url, model, one_call, threads=8)
        assert executions <= 48, f"{executions} executions for 64 requests"


def test_torch_family_gets_the_same_ragged_batches(tmp_path: Path) -> None:
    """``simple_ragged_torch``: a TorchScript model takes the flat INPUT__0 and the server's
    LENGTHS__1 as forward() arguments 0 and 1, like any other input of the PyTorch service."""
    pytest.importorskip("torch")
    from examples.build_torch import RAGGED_NAMES, build_torch_repository
    from services.torch.runtime import TorchRuntime

    build_torch_repository(tmp_path, ["simple_ragged_torch"])
    drive_family(tmp_path, TorchRuntime, "simple_ragged_torch", RAGGED_NAMES, batch=3)


def test_tensorflow_family_gets_the_same_ragged_batches(tmp_path: Path) -> None:
    """``simple_ragged_tf``: a SavedModel whose signature takes the flat INPUT and OFFSETS
    (where each request starts and ends). Requests of batch 1 only: one offset pair per request
    is what this kind describes."""
    pytest.importorskip("tensorflow")
    from examples.build_tensorflow import RAGGED_NAMES, build_tensorflow_repository
    from services.tensorflow.runtime import TensorflowRuntime

    build_tensorflow_repository(tmp_path, ["simple_ragged_tf"])
    drive_family(tmp_path, TensorflowRuntime, "simple_ragged_tf", RAGGED_NAMES, batch=1)
