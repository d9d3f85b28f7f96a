"""tritonclient.grpc (sync and asyncio) against the real ONNX service: infer, metadata, config,
statistics, index, streaming and batching."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.support import ServerThread, batched_counts, settings_for


@pytest.fixture(scope="module")
def onnx_server(example_repo: Path, grpc_frontend: str) -> Iterator[ServerThread]:
    """The ONNX service over the example repository, on each gRPC transport in turn."""
    from services.onnx.runtime import OnnxRuntime

    settings = settings_for(example_repo, grpc_frontend=grpc_frontend)
    with ServerThread(settings, [OnnxRuntime]) as server:
        yield server


@pytest.fixture
def client(onnx_server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(onnx_server.grpc_url)
    try:
        yield c
    finally:
        c.close()


def simple_inputs(a: np.ndarray, b: np.ndarray, mod: Any = grpcclient) -> list[Any]:
    i0 = mod.InferInput("INPUT0", list(a.shape), "INT32")
    i1 = mod.InferInput("INPUT1", list(b.shape), "INT32")
    i0.set_data_from_numpy(a)
    i1.set_data_from_numpy(b)
    return [i0, i1]


def test_health_and_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "7")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "meshserve"
    assert "statistics" in meta["extensions"]
    assert "system_shared_memory" in meta["extensions"]
    assert "sequence" in meta["extensions"]  # the sequence batcher
    assert "cuda_shared_memory" not in meta["extensions"]
    assert "trace" not in meta["extensions"]  # no OTLP endpoint: TraceSetting cannot change it


def test_model_metadata_and_config(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("simple", as_json=True)
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "INT32", ["-1", "16"]),
        ("INPUT1", "INT32", ["-1", "16"]),
    ]
    config = client.get_model_config("simple", as_json=True)["config"]
    assert config["name"] == "simple"
    assert config["max_batch_size"] == 8
    assert "dynamic_batching" in config
    assert config["instance_group"][0]["count"] >= 1


def test_infer_simple_sum_and_difference(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.int32)
    result = client.infer("simple", simple_inputs(a, b), request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    resp = result.get_response()
    assert resp.id == "req-7"
    assert resp.model_name == "simple" and resp.model_version == "1"


def test_requested_output_only(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    out = [grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", simple_inputs(a, a), outputs=out)
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16), np.int32))


def test_infer_strings_and_identity(client: grpcclient.InferenceServerClient) -> None:
    a = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    b = np.array([[b"1"] * 16], dtype=object)
    i0 = grpcclient.InferInput("INPUT0", [1, 16], "BYTES")
    i1 = grpcclient.InferInput("INPUT1", [1, 16], "BYTES")
    i0.set_data_from_numpy(a)
    i1.set_data_from_numpy(b)
    result = client.infer("simple_string", [i0, i1])
    assert [int(x) for x in result.as_numpy("OUTPUT0")[0]] == [i + 1 for i in range(16)]
    assert [int(x) for x in result.as_numpy("OUTPUT1")[0]] == [i - 1 for i in range(16)]

    data = np.array([[b"hello", b"", "żółw".encode()]], dtype=object)
    ident = grpcclient.InferInput("INPUT0", [1, 3], "BYTES")
    ident.set_data_from_numpy(data)
    out = client.infer("simple_identity", [ident]).as_numpy("OUTPUT0")
    assert out.tolist() == data.tolist()

    # ONNX Runtime string tensors hold text: other bytes get a clear error, not a crash
    ident = grpcclient.InferInput("INPUT0", [1, 1], "BYTES")
    ident.set_data_from_numpy(np.array([[b"\xff\x00"]], dtype=object))
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple_identity", [ident])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "UTF-8" in info.value.message()


def test_mlp_and_cnn_with_classification(client: grpcclient.InferenceServerClient) -> None:
    x = np.random.default_rng(1).random((4, 256), dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [4, 256], "FP32")
    inp.set_data_from_numpy(x)
    y = client.infer("mlp", [inp]).as_numpy("OUTPUT0")
    assert y.shape == (4, 10) and y.dtype == np.float32

    img = np.random.default_rng(2).random((2, 3, 64, 64), dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [2, 3, 64, 64], "FP32")
    inp.set_data_from_numpy(img)
    raw = client.infer("cnn", [inp]).as_numpy("OUTPUT0")
    top = client.infer(
        "cnn", [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)]
    )
    classes = top.as_numpy("OUTPUT0")
    assert classes.shape == (2, 3)
    for row, scores in zip(classes, raw, strict=True):
        value, index, *label = row[0].decode().split(":")
        assert int(index) == int(np.argmax(scores))
        assert float(value) == pytest.approx(float(scores.max()), rel=1e-4)
        assert label and label[0]


def test_statistics_and_index(client: grpcclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    before = client.get_inference_statistics("simple", as_json=True)["model_stats"][0]
    for _ in range(3):
        client.infer("simple", simple_inputs(a, a))
    stats = client.get_inference_statistics("simple", "1", as_json=True)["model_stats"][0]
    assert stats["name"] == "simple" and stats["version"] == "1"
    done = int(stats["inference_stats"]["success"]["count"]) - int(
        before.get("inference_stats", {}).get("success", {}).get("count", 0)
    )
    assert done == 3
    assert int(stats["inference_stats"]["compute_infer"]["ns"]) > 0
    assert stats["batch_stats"] and int(stats["batch_stats"][0]["batch_size"]) >= 1
    all_stats = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {"simple", "mlp", "cnn"} <= {s["name"] for s in all_stats}

    index = client.get_model_repository_index(as_json=True)["models"]
    by_name = {m["name"]: m for m in index}
    assert by_name["simple"]["state"] == "READY" and by_name["simple"]["version"] == "1"


def test_streaming(client: grpcclient.InferenceServerClient) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        for i in range(5):
            client.async_stream_infer("simple", simple_inputs(a, a * i), request_id=str(i))
        client.async_stream_infer("no_such_model", simple_inputs(a, a), request_id="bad")
        got: dict[str, Any] = {}
        errors = []
        for _ in range(6):
            result, error = results.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("OUTPUT0")
    finally:
        client.stop_stream()
    assert sorted(got) == ["0", "1", "2", "3", "4"]
    for i in range(5):
        np.testing.assert_array_equal(got[str(i)], a + a * i)
    assert len(errors) == 1 and "no_such_model" in str(errors[0])


def test_concurrent_requests_are_batched(
    client: grpcclient.InferenceServerClient, onnx_server: ServerThread
) -> None:
    """Many callers at once: the statistics show fewer executions than requests."""
    x = np.random.default_rng(3).random((1, 256), dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", [1, 256], "FP32")
    inp.set_data_from_numpy(x)
    inferences, executions = batched_counts(
        onnx_server.grpc_url, "mlp", lambda c: c.infer("mlp", [inp])
    )
    assert inferences == 16 * 8
    assert executions < inferences
    after = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    assert any(int(b["batch_size"]) > 1 for b in after["batch_stats"])


def test_asyncio_client(onnx_server: ServerThread) -> None:
    async def main() -> None:
        client = aioclient.InferenceServerClient(onnx_server.grpc_url)
        try:
            assert await client.is_server_ready()
            a = np.arange(16, dtype=np.int32).reshape(1, 16)
            results = await asyncio.gather(
                *(client.infer("simple", simple_inputs(a, a * i, aioclient)) for i in range(8))
            )
            for i, r in enumerate(results):
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + a * i)
            meta = await client.get_model_metadata("mlp", as_json=True)
            assert meta["outputs"][0]["shape"] == ["-1", "10"]
        finally:
            await client.close()

    asyncio.run(main())


def test_runtime_failure_is_reported_and_server_keeps_serving(
    client: grpcclient.InferenceServerClient,
) -> None:
    """A string that is not a number makes the model's Cast fail: the caller learns why."""
    bad = np.array([[b"twelve"] * 16], dtype=object)
    i0 = grpcclient.InferInput("INPUT0", [1, 16], "BYTES")
    i1 = grpcclient.InferInput("INPUT1", [1, 16], "BYTES")
    i0.set_data_from_numpy(bad)
    i1.set_data_from_numpy(bad)
    with pytest.raises(InferenceServerException) as info:
        client.infer("simple_string", [i0, i1])
    assert info.value.status() == "StatusCode.INTERNAL"
    assert "simple_string" in info.value.message() and "Cast" in info.value.message()
    good = np.array([[b"1"] * 16], dtype=object)
    i0.set_data_from_numpy(good)
    i1.set_data_from_numpy(good)
    assert client.infer("simple_string", [i0, i1]).as_numpy("OUTPUT0")[0, 0] == b"2"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_messages(client: grpcclient.InferenceServerClient, algorithm: str) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    result = client.infer("simple", simple_inputs(a, a), compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)


def test_priority_and_timeout_parameters_are_accepted(
    client: grpcclient.InferenceServerClient,
) -> None:
    """simple has one priority level: any priority maps to it (as in Triton)."""
    a = np.ones((1, 16), dtype=np.int32)
    result = client.infer("simple", simple_inputs(a, a), priority=1, timeout=10_000_000)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((1, 16), np.int32))
