"""The Python service in the whole mesh: BLS (a Python model calls the ONNX model ``simple`` by
the gateway's routes, straight to the ONNX service), a decoupled model streaming its responses
through the gateway, and decoupled BLS.

One mesh serves ``simple`` (ONNX service) and ``bls_python``, ``repeat_python`` and
``bls_decoupled_python`` (Python service) from one repository. A client calls ``bls_python``
through the gateway; its ``execute`` sends a BLS request to ``simple``, routed by the gateway's
routes (the supervisor sets ``MESHSERVE_XDS``) straight to the ONNX service, and doubles the sum
the ONNX service computed. A BLS call to a model that does not exist fails only that request,
with the BLS error's text reaching the client. ``bls_decoupled_python`` calls the decoupled ``repeat_python`` with
``exec(decoupled=True)`` / ``async_exec(decoupled=True)``: a ModelStreamInfer through the
gateway, whose streamed responses it joins into its one answer. ``text_stream_python`` streams
words over HTTP through the gateway with the generate extension (``/generate_stream``, SSE).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from examples.build_python import build_python_repository
from tests.e2e.conftest import MeshHandle, running_mesh
from tests.e2e.envoy_stats import gateway_requests_to
from tests.e2e.traffic import simple_inputs

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshHandle]:
    from examples.build_repository import build_repository

    root: Path = tmp_path_factory.mktemp("bls")
    repo = root / "models"
    repo.mkdir()
    build_repository(repo, ["simple"])
    build_python_repository(
        repo, ["bls_python", "repeat_python", "bls_decoupled_python", "text_stream_python"]
    )
    with running_mesh(repo, root) as handle:
        yield handle


def test_bls_model_gets_its_answer_from_the_onnx_service(mesh: MeshHandle) -> None:
    inputs, total = simple_inputs(3)
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        assert client.is_model_ready("bls_python") and client.is_model_ready("simple")
        before = client.get_inference_statistics("simple", as_json=True)["model_stats"][0]
        through_envoy = gateway_requests_to(mesh, "simple")
        for _ in range(3):
            result = client.infer("bls_python", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * total)
        # the BLS calls went to the ONNX service by the gateway's routes, not through Envoy …
        assert gateway_requests_to(mesh, "simple") == through_envoy
        # … and it did the sums: its statistics count them
        after = client.get_inference_statistics("simple", as_json=True)["model_stats"][0]
        assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 3


def test_bls_error_text_reaches_the_client(mesh: MeshHandle) -> None:
    inputs, total = simple_inputs(1)
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="BLS call to 'no_such_model' failed"):
            client.infer("bls_python", inputs, parameters={"bls_model": "no_such_model"})
        result = client.infer("bls_python", inputs)  # the service keeps serving
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * total)


def test_decoupled_model_streams_through_the_gateway(mesh: MeshHandle) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        tensor = grpcclient.InferInput("IN", [3], "INT32")
        tensor.set_data_from_numpy(np.array([7, 8, 9], dtype=np.int32))
        client.async_stream_infer(
            "repeat_python", [tensor], request_id="s1", enable_empty_final_response=True
        )
        got = [results.get(timeout=10) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    assert all(error is None for _, error in got)
    assert [int(r.as_numpy("OUT")[0]) for r, _ in got[:3]] == [7, 8, 9]
    final = got[3][0].get_response().parameters["triton_final_response"].bool_param
    assert final and got[3][0].as_numpy("OUT") is None


def _repeat_inputs(values: list[int], delay_ms: int = 0) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("IN", [len(values)], "INT32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.int32))
    if not delay_ms:
        return [tensor]
    delay = grpcclient.InferInput("DELAY_MS", [1], "UINT32")
    delay.set_data_from_numpy(np.array([delay_ms], dtype=np.uint32))
    return [tensor, delay]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_decoupled_bls_returns_what_the_decoupled_model_streamed(
    mesh: MeshHandle, mode: str
) -> None:
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        before = client.get_inference_statistics("repeat_python", as_json=True)
        result = client.infer(
            "bls_decoupled_python",
            _repeat_inputs([3, 1, 4, 1], delay_ms=5),
            parameters={"bls_mode": mode},
        )
        np.testing.assert_array_equal(result.as_numpy("OUT"), np.array([3, 1, 4, 1], np.int32))
        # four responses, then the empty final one
        np.testing.assert_array_equal(result.as_numpy("RESPONSES"), np.array([5], np.uint32))
        after = client.get_inference_statistics("repeat_python", as_json=True)
    # the decoupled model served the BLS stream itself
    count = int(after["model_stats"][0]["inference_count"])
    assert count > int(before["model_stats"][0].get("inference_count", 0))


def test_decoupled_bls_error_text_reaches_the_client(mesh: MeshHandle) -> None:
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer("bls_decoupled_python", _repeat_inputs([2, -5, 6]))
        assert "failed after 1 responses" in info.value.message()
        assert "IN[1] is -5; repeat takes non-negative values" in info.value.message()
        result = client.infer("bls_decoupled_python", _repeat_inputs([8]))  # still serving
        np.testing.assert_array_equal(result.as_numpy("OUT"), np.array([8], np.int32))


def test_unary_bls_to_a_decoupled_model_is_refused_as_in_triton(mesh: MeshHandle) -> None:
    refused = pytest.raises(InferenceServerException, match="uses the decoupled transaction")
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client, refused:
        client.infer("bls_decoupled_python", _repeat_inputs([1]), parameters={"bls_mode": "unary"})


def test_generate_stream_events_pass_the_gateway_as_they_are_sent(mesh: MeshHandle) -> None:
    conn = http.client.HTTPConnection(mesh.settings.host, mesh.settings.http_port, timeout=30)
    body = {"text_input": "through the gateway", "parameters": {"delay_ms": 500}}
    try:
        conn.request("POST", "/v2/models/text_stream_python/generate_stream", json.dumps(body))
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        first = json.loads(response.readline().removeprefix(b"data: "))
        first_at = time.monotonic()
        rest = [json.loads(b[len(b"data: ") :]) for b in response.read().split(b"\n\n") if b]
        # the model sleeps 0.5 s after each word: a gateway that buffered the stream would
        # hand over the first event together with the last, not ~1 s before it
        assert time.monotonic() - first_at > 0.8
    finally:
        conn.close()
    words = [first["text_output"], *(e["text_output"] for e in rest)]
    assert words == ["through", " the", " gateway"]


def test_generate_through_the_gateway(mesh: MeshHandle) -> None:
    conn = http.client.HTTPConnection(mesh.settings.host, mesh.settings.http_port, timeout=30)
    body = {"INPUT0": list(range(16)), "INPUT1": [1] * 16}
    try:
        conn.request("POST", "/v2/models/simple/versions/1/generate", json.dumps(body))
        response = conn.getresponse()
        doc = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, doc
    assert (doc["model_name"], doc["OUTPUT0"]) == ("simple", [x + 1 for x in range(16)])
