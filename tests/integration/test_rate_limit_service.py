"""The rate limiter on the real ONNX service: two models whose instances each need resource R:1,
with --rate-limit-resource R:1, never execute at the same time; with --rate-limit=off they do.

How overlap is told: every execution's compute time (input + infer + output, from the models'
statistics) lies inside the window between the first request sent and the last response
received. Executions that never overlap add up to at most that window; two models busy side by
side add up to nearly twice it. Each model is a chain of matrix products on one intra-op
thread (tens of milliseconds a request, small tensors on the wire), driven by two client threads
per model at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

from examples.cli import write_if_changed
from examples.onnx_graph import finish_model, value_info
from services.onnx.runtime import OnnxRuntime
from tests.support import ServerThread, settings_for

SIZE = 320
PRODUCTS = 40
MODELS = ("slow_a", "slow_b")
CLIENTS_PER_MODEL = 2
REQUESTS_PER_CLIENT = 4

CONFIG = """
name: "%(name)s"
backend: "onnxruntime"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1, %(size)d ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1, %(size)d ] } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
instance_group [ {
  count: 1
  kind: KIND_CPU
  rate_limiter { resources [ { name: "R" count: %(count)d } ] }
} ]
"""


def build_repository(root: Path) -> None:
    """slow_a and slow_b need R:1; greedy needs R:2, more than --rate-limit-resource R:1 gives.
    Each tiles X to a square, multiplies it by the identity PRODUCTS times and averages the rows
    back: Y equals X, at a known cost."""
    eye = numpy_helper.from_array(np.eye(SIZE, dtype=np.float32), "I")
    repeats = numpy_helper.from_array(np.array([SIZE, 1], np.int64), "repeats")
    nodes = [helper.make_node("Tile", ["X", "repeats"], ["t0"])]
    nodes += [helper.make_node("MatMul", [f"t{i}", "I"], [f"t{i + 1}"]) for i in range(PRODUCTS)]
    nodes.append(helper.make_node("ReduceMean", [f"t{PRODUCTS}"], ["Y"], axes=[0], keepdims=1))
    graph = helper.make_graph(
        nodes,
        "chain",
        [value_info("X", TensorProto.FLOAT, [1, SIZE])],
        [value_info("Y", TensorProto.FLOAT, [1, SIZE])],
        initializer=[eye, repeats],
    )
    onnx_bytes = finish_model(graph).SerializeToString()
    for name, count in (*((m, 1) for m in MODELS), ("greedy", 2)):
        text = CONFIG % {"name": name, "size": SIZE, "count": count}
        write_if_changed(root / name / "config.pbtxt", text.encode())
        write_if_changed(root / name / "1" / "model.onnx", onnx_bytes)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rate_limited_models")
    build_repository(root)
    return root


def serve(repository: Path, rate_limit: str) -> Iterator[ServerThread]:
    settings = settings_for(
        repository,
        rate_limit=rate_limit,
        rate_limit_resources=(("R", 1, -1),) if rate_limit != "off" else (),
    )
    with ServerThread(settings, [OnnxRuntime]) as server:
        yield server


@pytest.fixture
def limited_server(repository: Path) -> Iterator[ServerThread]:
    yield from serve(repository, "execution_count")


@pytest.fixture
def unlimited_server(repository: Path) -> Iterator[ServerThread]:
    yield from serve(repository, "off")


def busy_ns(client: grpcclient.InferenceServerClient) -> int:
    """Compute time (input + infer + output) the two models spent executing so far."""
    total = 0
    for model in MODELS:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        phases = stats["inference_stats"]
        total += sum(int(phases[p].get("ns", 0)) for p in ("compute_input", "compute_infer"))
        total += int(phases["compute_output"].get("ns", 0))
    return total


def drive_both_models(url: str) -> tuple[int, int]:
    """Send every request of every client thread at once; (busy ns added, window ns)."""
    x = np.random.default_rng(7).random((1, SIZE), dtype=np.float32)

    def client_thread(model: str) -> None:
        with grpcclient.InferenceServerClient(url) as client:
            for _ in range(REQUESTS_PER_CLIENT):
                tensor = grpcclient.InferInput("X", [1, SIZE], "FP32")
                tensor.set_data_from_numpy(x)
                result = client.infer(model, [tensor])
                np.testing.assert_allclose(result.as_numpy("Y"), x, rtol=1e-5)

    with grpcclient.InferenceServerClient(url) as client:
        for model in MODELS:  # load each session's kernels before the measured window
            tensor = grpcclient.InferInput("X", [1, SIZE], "FP32")
            tensor.set_data_from_numpy(x)
            client.infer(model, [tensor])
        before = busy_ns(client)
        threads = [m for m in MODELS for _ in range(CLIENTS_PER_MODEL)]
        with ThreadPoolExecutor(len(threads)) as pool:
            start = time.monotonic_ns()
            for done in [pool.submit(client_thread, m) for m in threads]:
                done.result()
            window = time.monotonic_ns() - start
        return busy_ns(client) - before, window


def test_models_that_share_a_resource_never_execute_at_once(limited_server: ServerThread) -> None:
    busy, window = drive_both_models(limited_server.grpc_url)
    assert busy <= window, f"{busy / 1e6:.0f} ms of execution in a {window / 1e6:.0f} ms window"
    # with the executions back to back, the two models kept the resource busy most of the time
    assert busy > 0.3 * window
    with grpcclient.InferenceServerClient(limited_server.grpc_url) as client:
        assert not client.is_model_ready("greedy")
        index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        reason = index["greedy"]["reason"]
        assert "needs 2 of rate_limiter resource 'R'" in reason
        assert "--rate-limit-resource makes only 1 available" in reason


def test_without_the_rate_limiter_the_models_overlap(unlimited_server: ServerThread) -> None:
    busy, window = drive_both_models(unlimited_server.grpc_url)
    assert busy > 1.3 * window, f"{busy / 1e6:.0f} ms of execution in a {window / 1e6:.0f} ms"
    with grpcclient.InferenceServerClient(unlimited_server.grpc_url) as client:
        assert client.is_model_ready("greedy")  # rate_limiter sections are ignored when off
