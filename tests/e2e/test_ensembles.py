"""Ensembles through the whole mesh: client → Envoy → ensemble service → step services.

One mesh serves the example ensembles (examples/build_ensemble.py) and their steps: Python
models (Pillow pre-processing, top-k, two slow branches, a decoupled repeat) on the Python
service, ``simple`` and ``cnn`` on the ONNX service. Every step is a real ModelInfer, routed by
the gateway's routes straight to the step's service (services/core/mesh_caller.py).
"""

from __future__ import annotations

import importlib.util
import io
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import MeshHandle, add_cached_copy, running_mesh, wait_for

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("PIL") is None,
    reason="onnxruntime and Pillow are needed (pip install '.[onnx,python]')",
)

#: chain3 with response_cache enabled (the services run with a cache)
CACHED_CHAIN = "chain3_cached"
#: the slow branches' delay (examples/build_python.py: delay_ms 400)
DELAY_S = 0.4


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshHandle]:
    from examples.build_ensemble import build_ensemble_repository

    root: Path = tmp_path_factory.mktemp("ensembles")
    repo = root / "models"
    build_ensemble_repository(repo)
    add_cached_copy(repo, "chain3", CACHED_CHAIN)
    with running_mesh(repo, root, cache_config=("local,size=1048576",)) as handle:
        yield handle


@pytest.fixture
def client(mesh: MeshHandle) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(mesh.grpc_url) as c:
        yield c


def _png(seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _int_input(name: str, array: np.ndarray, module: Any = grpcclient) -> Any:
    tensor = module.InferInput(name, list(array.shape), "INT32")
    tensor.set_data_from_numpy(array)
    return tensor


def _image_input(data: bytes, module: Any = grpcclient) -> Any:
    tensor = module.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data]], dtype=object))
    return tensor


def _success(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model).model_stats
    total = [(s.inference_stats.success.count, s.inference_stats.fail.count) for s in stats]
    return sum(t[0] for t in total), sum(t[1] for t in total)


def test_image_classifier_matches_its_steps_called_one_by_one(
    client: grpcclient.InferenceServerClient,
) -> None:
    image = _png(1)
    result = client.infer("image_classifier", [_image_input(image)], request_id="img-1")
    labels = [v.decode() for v in result.as_numpy("LABELS")[0]]
    probs = result.as_numpy("PROBS")[0]
    assert result.get_response().id == "img-1"
    # the same three models, called by the client through the gateway
    pixels = client.infer("preprocess_image_python", [_image_input(image)]).as_numpy("PIXELS")
    cnn_in = grpcclient.InferInput("INPUT0", list(pixels.shape), "FP32")
    cnn_in.set_data_from_numpy(pixels)
    scores = client.infer("cnn", [cnn_in]).as_numpy("OUTPUT0")[0].astype(np.float64)
    softmax = np.exp(scores - scores.max())
    softmax /= softmax.sum()
    np.testing.assert_allclose(probs, np.sort(softmax)[::-1][:3], rtol=1e-4)
    # cnn's own top-3 classification ("score:index:label") names the same labels, in order
    top3 = client.infer(
        "cnn", [cnn_in], outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)]
    ).as_numpy("OUTPUT0")[0]
    assert labels == [v.decode().split(":", 2)[2] for v in top3]


def test_image_classifier_over_http(mesh: MeshHandle) -> None:
    with httpclient.InferenceServerClient(mesh.http_url) as c:
        result = c.infer("image_classifier", [_image_input(_png(2), httpclient)])
    probs = result.as_numpy("PROBS")[0]
    assert probs.shape == (3,) and np.all(np.diff(probs) <= 0) and 0 < probs.sum() <= 1.0001


def test_bad_image_fails_naming_the_step(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("image_classifier", [_image_input(b"not an image")])
    message = err.value.message()
    assert "ensemble 'image_classifier' step" in message
    assert "(model 'preprocess_image_python')" in message
    # the service keeps serving
    assert client.infer("image_classifier", [_image_input(_png(3))]).as_numpy("PROBS") is not None


def test_parallel_branches_take_one_delay_not_two(
    client: grpcclient.InferenceServerClient,
) -> None:
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    client.infer("parallel_branches", [_int_input("INPUT0", x)])  # warm: channels, first calls
    t0 = time.monotonic()
    result = client.infer("parallel_branches", [_int_input("INPUT0", x)])
    elapsed = time.monotonic() - t0
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * x)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x + 1)
    # one branch takes DELAY_S; run one after the other they would take 2 * DELAY_S
    assert DELAY_S <= elapsed < 1.6 * DELAY_S, f"took {elapsed:.3f} s"


def test_branch_join_chain_and_nested(client: grpcclient.InferenceServerClient) -> None:
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    joined = client.infer("branch_join", [_int_input("INPUT0", x)])
    np.testing.assert_array_equal(joined.as_numpy("OUTPUT0"), 3 * x + 1)
    np.testing.assert_array_equal(joined.as_numpy("OUTPUT1"), x - 1)
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 7, dtype=np.int32)
    ins = [_int_input("INPUT0", a), _int_input("INPUT1", b)]
    chained = client.infer("chain3", ins)
    np.testing.assert_array_equal(chained.as_numpy("OUTPUT0"), 2 * (a + b))
    np.testing.assert_array_equal(chained.as_numpy("OUTPUT1"), 2 * (a - b))
    nested = client.infer("nested_ensemble", ins)
    np.testing.assert_array_equal(nested.as_numpy("OUTPUT0"), 4 * a)
    np.testing.assert_array_equal(nested.as_numpy("OUTPUT1"), 4 * b)


def test_ensemble_tensors_in_shared_memory(client: grpcclient.InferenceServerClient) -> None:
    """The ensemble service reads the client's inputs from a region registered at the gateway,
    passes them to its steps as tensors, and writes its output into the region."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 7, dtype=np.int32)
    key = f"/meshserve_ensemble_{os.getpid()}"
    handle = shm.create_shared_memory_region("ensemble", key, 3 * a.nbytes)
    try:
        shm.set_shared_memory_region(handle, [a, b, np.zeros_like(a)])
        client.register_system_shared_memory("ensemble", key, 3 * a.nbytes)
        ins = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        ins[0].set_shared_memory("ensemble", a.nbytes)
        ins[1].set_shared_memory("ensemble", a.nbytes, offset=a.nbytes)
        outs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
        outs[0].set_shared_memory("ensemble", a.nbytes, offset=2 * a.nbytes)
        result = client.infer("chain3", ins, outputs=outs)
        written = shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=2 * a.nbytes)
        np.testing.assert_array_equal(written, 2 * (a + b))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 2 * (a - b))
    finally:
        client.unregister_system_shared_memory("ensemble")
        shm.destroy_shared_memory_region(handle)


def test_ensemble_config_metadata_and_statistics_through_the_gateway(
    client: grpcclient.InferenceServerClient,
) -> None:
    config = client.get_model_config("chain3").config
    assert config.platform == "ensemble"
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["simple"] * 3
    assert client.get_model_metadata("chain3").platform == "ensemble"
    before, _ = _success(client, "chain3")
    simple_before, _ = _success(client, "simple")
    ins = [_int_input(n, np.ones((1, 16), np.int32)) for n in ("INPUT0", "INPUT1")]
    client.infer("chain3", ins)
    assert _success(client, "chain3")[0] == before + 1
    assert _success(client, "simple")[0] >= simple_before + 3


def test_a_cached_ensemble_answers_a_repeat_without_calling_its_steps(
    client: grpcclient.InferenceServerClient,
) -> None:
    a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.full((1, 16), 5, np.int32)
    simple_before, _ = _success(client, "simple")
    results = [
        client.infer(CACHED_CHAIN, [_int_input("INPUT0", a), _int_input("INPUT1", b)])
        for _ in range(2)
    ]
    for result in results:  # (a+b, a-b) three times over: 2(a+b), 2(a-b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * (a + b))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), 2 * (a - b))
    assert _success(client, "simple")[0] == simple_before + 3  # the second call ran no step
    stats = client.get_inference_statistics(CACHED_CHAIN).model_stats[0].inference_stats
    assert (stats.success.count, stats.cache_hit.count, stats.cache_miss.count) == (2, 1, 1)


def test_cancellation_reaches_the_steps(client: grpcclient.InferenceServerClient) -> None:
    """branch_join: two slow branches, then ``simple``. Cancelled while the branches sleep, the
    client's cancel travels gateway → ensemble → gateway → Python service (whose requests end
    CANCELED) and the join step never runs."""
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    client.infer("branch_join", [_int_input("INPUT0", x)])
    _, a_failed = _success(client, "slow_a_python")
    _, b_failed = _success(client, "slow_b_python")
    simple_done, _ = _success(client, "simple")
    answered = threading.Event()
    seen: list[Any] = []

    def callback(result: Any, error: Any) -> None:
        seen.append(error)
        answered.set()

    call = client.async_infer("branch_join", [_int_input("INPUT0", x)], callback)
    time.sleep(DELAY_S / 3)
    call.cancel()
    assert answered.wait(5)
    assert seen and seen[0] is not None and "CANCELLED" in str(seen[0])
    wait_for(
        lambda: (
            _success(client, "slow_a_python")[1] > a_failed
            and _success(client, "slow_b_python")[1] > b_failed
        ),
        within_s=5,
        what="the slow branches' requests ended as failed (CANCELED)",
    )
    time.sleep(DELAY_S)  # long after the branches would have finished
    assert _success(client, "simple")[0] == simple_done, "the join step ran after the cancel"


def test_deadline_reaches_the_steps(client: grpcclient.InferenceServerClient) -> None:
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    _, a_failed = _success(client, "slow_a_python")
    with pytest.raises(InferenceServerException) as err:
        client.infer("parallel_branches", [_int_input("INPUT0", x)], client_timeout=DELAY_S / 3)
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    wait_for(
        lambda: _success(client, "slow_a_python")[1] > a_failed,
        within_s=5,
        what="the branch's request ended when the caller's deadline passed",
    )


def test_decoupled_ensemble_streams_through_the_gateway(mesh: MeshHandle) -> None:
    """repeat_then_simple: ``repeat_count_python`` (Python service) streams COUNT responses, each
    runs ``simple`` (ONNX service); every call crosses Envoy. One ensemble response per k, then
    exactly one final flag."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    count = grpcclient.InferInput("COUNT", [1, 1], "UINT32")
    count.set_data_from_numpy(np.array([[4]], dtype=np.uint32))
    with grpcclient.InferenceServerClient(mesh.grpc_url) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            c.async_stream_infer(
                "repeat_then_simple",
                [_int_input("INPUT0", x), count],
                request_id="stream-1",
                enable_empty_final_response=True,
            )
            responses = []
            while True:
                result, error = results.get(timeout=20)
                assert error is None, error
                responses.append(result)
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
        finally:
            c.stop_stream()
    data = [r for r in responses if r.as_numpy("OUTPUT0") is not None]
    assert sorted(int(r.as_numpy("OUTPUT0")[0, 0]) for r in data) == [0, 1, 2, 3]
    for r in data:
        k = int(r.as_numpy("OUTPUT0")[0, 0])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x + k)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - k)
        assert r.get_response().id == "stream-1"
    assert len(responses) in (4, 5)  # the final flag on the last response, or alone after it
    with (
        pytest.raises(InferenceServerException) as err,
        grpcclient.InferenceServerClient(mesh.grpc_url) as c,
    ):
        c.infer("repeat_then_simple", [_int_input("INPUT0", x), count])
    assert "ModelStreamInfer" in err.value.message()


def test_every_service_offers_a_local_link_that_serves_model_infer(mesh: MeshHandle) -> None:
    """The steps of the ensembles above reach their services over local links (local_links.py;
    test_mesh_caller.py checks that routed calls take them): every service of the mesh offers
    one on its gRPC port, and a ModelInfer sent over the ONNX service's link is answered as it
    would be over gRPC, routing headers and all."""
    import asyncio

    from protos.gen.inference import grpc_service_pb2 as pb
    from services.core.gateway_client import routing_metadata
    from services.core.local_links import LocalLinks

    doc = mesh.status()
    assert doc is not None
    instances = {i["family"]: i["address"] for i in doc["instances"]}
    assert {"onnx", "python", "ensemble"} <= set(instances)
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    request = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(x.ravel().tolist())

    async def over_links() -> pb.ModelInferResponse:
        links = LocalLinks()
        try:
            for address in instances.values():
                assert await links.connect(address) is not None, f"no local link at {address}"
            caller = links.ready(instances["onnx"])
            assert caller is not None
            reply = await caller.unary(
                instances["onnx"],
                "/inference.GRPCInferenceService/ModelInfer",
                request.SerializeToString(),
                metadata=routing_metadata("simple", ""),
                timeout=10,
            )
            return pb.ModelInferResponse.FromString(bytes(reply))
        finally:
            links.close()

    reply = asyncio.run(over_links())
    assert reply.model_name == "simple"
    outputs = {o.name: o for o in reply.outputs}
    total = np.frombuffer(reply.raw_output_contents[list(outputs).index("OUTPUT0")], np.int32)
    np.testing.assert_array_equal(total, (x + x).ravel())
