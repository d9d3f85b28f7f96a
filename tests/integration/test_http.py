"""HTTP/REST v2 against the real ONNX service through tritonclient.http (sync and aio): health,
metadata, config, inference (JSON, binary, BYTES, compression, classification), statistics,
repository control, shared memory and settings. Raw-HTTP cases are in test_http_errors.py."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.support import ServerThread, settings_for


@pytest.fixture
def client(onnx_server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(onnx_server.http_url)
    try:
        yield c
    finally:
        c.close()


def simple_inputs(
    a: np.ndarray, b: np.ndarray, binary: bool = True, mod: Any = httpclient
) -> list[Any]:
    out = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        i = mod.InferInput(name, list(value.shape), "INT32")
        i.set_data_from_numpy(value, binary_data=binary)
        out.append(i)
    return out


def outputs(binary: bool, mod: Any = httpclient) -> list[Any]:
    return [mod.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]


# ---- health, metadata, config ------------------------------------------------------------
def test_health_and_server_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "7")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata()
    assert meta["name"] == "meshserve"
    assert "binary_tensor_data" in meta["extensions"]
    assert "statistics" in meta["extensions"]


def test_model_metadata_and_config_use_numbers(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("simple")
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("INPUT1", "INT32", [-1, 16]),
    ]
    assert client.get_model_metadata("simple", "1")["name"] == "simple"
    config = client.get_model_config("simple")
    assert config["name"] == "simple"
    assert config["max_batch_size"] == 8
    assert config["input"][0]["dims"] == [16]
    assert config["input"][0]["data_type"] == "TYPE_INT32"
    assert config["instance_group"][0]["count"] >= 1
    assert "dynamic_batching" in config


# ---- inference ------------------------------------------------------------------------------
@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, True), (True, False)])
def test_infer_simple(
    client: httpclient.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.int32)
    result = client.infer(
        "simple", simple_inputs(a, b, binary_in), outputs=outputs(binary_out), request_id="r-1"
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    resp = result.get_response()
    assert resp["id"] == "r-1"
    assert (resp["model_name"], resp["model_version"]) == ("simple", "1")


def test_infer_all_outputs_by_default(client: httpclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    result = client.infer("simple", simple_inputs(a, a), model_version="1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - a)


@pytest.mark.parametrize("binary", [True, False])
def test_infer_bytes(client: httpclient.InferenceServerClient, binary: bool) -> None:
    a = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    b = np.array([[b"1"] * 16], dtype=object)
    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        i = httpclient.InferInput(name, [1, 16], "BYTES")
        i.set_data_from_numpy(value, binary_data=binary)
        inputs.append(i)
    result = client.infer("simple_string", inputs, outputs=outputs(binary))
    expected = np.array([[str(i + 1).encode() for i in range(16)]], dtype=object)
    got = result.as_numpy("OUTPUT0")
    assert got is not None
    assert [x if isinstance(x, bytes) else str(x).encode() for x in got.ravel()] == list(
        expected.ravel()
    )


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_and_response(
    client: httpclient.InferenceServerClient, algorithm: str
) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    result = client.infer(
        "simple",
        simple_inputs(a, a),
        outputs=outputs(True),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + a)


async def test_aio_client_compressed_and_json(onnx_server: ServerThread) -> None:
    c = aioclient.InferenceServerClient(onnx_server.http_url)
    try:
        assert await c.is_server_ready()
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        for algorithm in ("gzip", "deflate", None):
            result = await c.infer(
                "simple",
                simple_inputs(a, a, binary=algorithm is None, mod=aioclient),
                outputs=outputs(algorithm is not None, mod=aioclient),
                request_compression_algorithm=algorithm,
                response_compression_algorithm=algorithm,
            )
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - a)
        config = await c.get_model_config("simple")
        assert config["max_batch_size"] == 8
    finally:
        await c.close()


def test_classification(client: httpclient.InferenceServerClient) -> None:
    image = np.random.default_rng(3).random((2, 3, 64, 64), dtype=np.float32)
    inp = httpclient.InferInput("INPUT0", list(image.shape), "FP32")
    inp.set_data_from_numpy(image)
    for binary in (True, False):
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary, class_count=3)
        top = client.infer("cnn", [inp], outputs=[out]).as_numpy("OUTPUT0")
        assert top is not None and top.shape == (2, 3)
        first = top[0, 0].decode() if isinstance(top[0, 0], bytes) else str(top[0, 0])
        score, index, label = first.split(":")
        assert float(score) >= 0 and 0 <= int(index) < 10 and label


def test_statistics_and_index(client: httpclient.InferenceServerClient) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    client.infer("simple", simple_inputs(a, a))
    stats = client.get_inference_statistics("simple")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("simple", "1")]
    success = stats[0]["inference_stats"]["success"]
    assert isinstance(success["count"], int) and success["count"] >= 1
    assert isinstance(stats[0]["inference_count"], int)
    assert client.get_inference_statistics("simple", "1")["model_stats"][0]["name"] == "simple"
    everything = client.get_inference_statistics()["model_stats"]
    assert {"simple", "cnn"} <= {s["name"] for s in everything}
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["simple"]["state"] == "READY" and index["simple"]["version"] == "1"


def test_log_and_trace_settings(client: httpclient.InferenceServerClient) -> None:
    settings = client.get_log_settings()
    assert settings["log_info"] is True
    updated = client.update_log_settings({"log_verbose_level": 1})
    assert updated["log_verbose_level"] == 1
    client.update_log_settings({"log_verbose_level": 0})
    with pytest.raises(InferenceServerException, match="log_verbose_level"):
        client.update_log_settings({"log_verbose_level": "high"})
    assert client.get_trace_settings()["trace_level"] == ["OFF"]
    assert client.get_trace_settings(model_name="simple")["trace_level"] == ["OFF"]


# ---- model control ----------------------------------------------------------------------------
def test_explicit_load_unload(repo_copy: Path) -> None:
    from services.onnx.runtime import OnnxRuntime

    settings = settings_for(repo_copy, model_control_mode="explicit", startup_models=("simple",))
    with ServerThread(settings, [OnnxRuntime]) as srv:
        c = httpclient.InferenceServerClient(srv.http_url)
        try:
            assert not c.is_model_ready("mlp")
            index = {m["name"]: m for m in c.get_model_repository_index()}
            assert index["mlp"].get("state", "") != "READY"
            c.load_model("mlp")
            assert c.is_model_ready("mlp")
            c.unload_model("mlp")
            assert not c.is_model_ready("mlp")
            with pytest.raises(InferenceServerException) as info:
                c.get_model_metadata("mlp")
            assert info.value.status() in ("503", "404")
            # a config override travels as a JSON string
            config = c.get_model_config("simple")
            config["max_batch_size"] = 2
            c.load_model("simple", config=json.dumps(config))
            assert c.get_model_config("simple")["max_batch_size"] == 2
            a = np.ones((4, 16), dtype=np.int32)
            with pytest.raises(InferenceServerException, match="batch"):
                c.infer("simple", simple_inputs(a, a))
            with pytest.raises(InferenceServerException) as info:
                c.load_model("simple", files={"file:1/model.onnx": b"x"})
            assert info.value.status() == "400"
        finally:
            c.close()


# ---- shared memory ----------------------------------------------------------------------------
def test_system_shared_memory(client: httpclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 2, dtype=np.int32)
    size = a.nbytes
    in_handle = shm.create_shared_memory_region("http_in", "/meshserve_http_in", size * 2)
    out_handle = shm.create_shared_memory_region("http_out", "/meshserve_http_out", size * 2)
    try:
        shm.set_shared_memory_region(in_handle, [a, b])
        client.register_system_shared_memory("http_in", "/meshserve_http_in", size * 2)
        client.register_system_shared_memory("http_out", "/meshserve_http_out", size * 2)
        status = {r["name"]: r for r in client.get_system_shared_memory_status()}
        assert status["http_in"]["byte_size"] == size * 2
        assert client.get_system_shared_memory_status("http_out")[0]["key"] == "/meshserve_http_out"
        inputs = simple_inputs(a, b)
        inputs[0].set_shared_memory("http_in", size, 0)
        inputs[1].set_shared_memory("http_in", size, size)
        outs = outputs(True)
        outs[0].set_shared_memory("http_out", size, 0)
        outs[1].set_shared_memory("http_out", size, size)
        result = client.infer("simple", inputs, outputs=outs)
        # as Triton answers: name, datatype and shape, no data and no parameters (Triton's C++
        # client, perf_analyzer among its users, reads any output parameters as binary data)
        assert result.get_output("OUTPUT1") == {
            "name": "OUTPUT1",
            "datatype": "INT32",
            "shape": [1, 16],
        }
        got0 = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16])
        got1 = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=size)
        np.testing.assert_array_equal(got0, a + b)
        np.testing.assert_array_equal(got1, a - b)
        client.unregister_system_shared_memory("http_in")
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["http_out"]
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
        with pytest.raises(InferenceServerException) as info:
            client.get_system_shared_memory_status("http_in")
        assert info.value.status() == "404"
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)


def test_cuda_shared_memory_is_refused(client: httpclient.InferenceServerClient) -> None:
    assert client.get_cuda_shared_memory_status() == []
    with pytest.raises(InferenceServerException) as info:
        client.register_cuda_shared_memory("gpu", base64.b64encode(b"handle"), 0, 64)
    assert info.value.status() == "501"
    assert "CUDA shared memory" in str(info.value.message())
    client.unregister_cuda_shared_memory()
