"""Triton's response cache in the real ONNX service (``--cache-config local,size=N``, models with
``response_cache { enable: true }``), driven with stock tritonclient over gRPC and HTTP: a repeated
request is answered without running the model and the statistics and metrics say so; what the
client asks of the answer (outputs, classification, shared memory) still applies; failures are
never cached; a model without the flag, or a service without a cache, runs every request;
unloading forgets a model's entries; a small cache evicts the least recently used."""

from __future__ import annotations

import logging
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from services.core.response_cache import ENTRY_OVERHEAD
from tests.support import ServerThread, settings_for

CACHED, UNCACHED = "simple", "simple_uncached"
#: one entry of `simple`: OUTPUT0 and OUTPUT1, [1, 16] INT32 each
ENTRY_BYTES = ENTRY_OVERHEAD + 2 * 16 * 4


def _repository(root: Path) -> Path:
    from examples.build_repository import build_repository

    build_repository(root, [CACHED])
    (root / UNCACHED).mkdir()
    (root / UNCACHED / "1").symlink_to(root / CACHED / "1")
    config = (root / CACHED / "config.pbtxt").read_text()
    (root / UNCACHED / "config.pbtxt").write_text(config.replace(f'"{CACHED}"', f'"{UNCACHED}"'))
    (root / CACHED / "config.pbtxt").write_text(config + "\nresponse_cache { enable: true }\n")
    return root


def _start(root: Path, **overrides: object) -> ServerThread:
    from services.onnx.runtime import OnnxRuntime

    return ServerThread(settings_for(root, **overrides), [OnnxRuntime]).start()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _repository(tmp_path_factory.mktemp("cache_models"))


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerThread]:
    running = _start(
        repository,
        response_cache_bytes=1 << 20,
        model_control_mode="explicit",
        startup_models=("*",),
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        yield c


def _pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(-1000, 1000, size=(2, 1, 16), dtype=np.int32)
    return a, b


def _inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    tensors = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    tensors[0].set_data_from_numpy(a)
    tensors[1].set_data_from_numpy(b)
    return tensors


def _infer(
    c: grpcclient.InferenceServerClient, model: str, seed: int, outputs: list[str] | None = None
) -> grpcclient.InferResult:
    a, b = _pair(seed)
    asked = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    return c.infer(model, _inputs(a, b), outputs=asked)


def _stats(c: grpcclient.InferenceServerClient, model: str) -> dict[str, int]:
    s = c.get_inference_statistics(model).model_stats[0]
    i = s.inference_stats
    return {
        "success": i.success.count,
        "fail": i.fail.count,
        "queue": i.queue.count,
        "compute": i.compute_infer.count,
        "hit": i.cache_hit.count,
        "miss": i.cache_miss.count,
        "inferences": s.inference_count,
        "executions": s.execution_count,
    }


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def _metric(server: ServerThread, name: str, model: str | None = None) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    labels = rf'\{{model="{model}",version="1"\}}' if model else ""
    found = re.search(rf"^{name}{labels} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} {model or ''} not in the metrics"
    return float(found.group(1))


def test_a_repeated_request_is_answered_without_running_the_model(
    server: ServerThread, client: grpcclient.InferenceServerClient
) -> None:
    before = _stats(client, CACHED)
    hits_metric = _metric(server, "nv_cache_num_hits_per_model", CACHED)
    a, b = _pair(1)
    first, second = (_infer(client, CACHED, 1) for _ in range(2))
    for result in (first, second):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    _infer(client, CACHED, 2)  # other inputs: a miss
    assert _delta(_stats(client, CACHED), before) == {
        "success": 3,
        "fail": 0,
        "queue": 3,
        "compute": 2,
        "hit": 1,
        "miss": 2,
        "inferences": 2,
        "executions": 2,
    }
    assert _metric(server, "nv_cache_num_hits_per_model", CACHED) == hits_metric + 1
    assert _metric(server, "nv_cache_num_entries") >= 2


def test_http_and_grpc_requests_with_the_same_inputs_share_an_entry(
    server: ServerThread, client: grpcclient.InferenceServerClient
) -> None:
    a, b = _pair(3)
    _infer(client, CACHED, 3)
    before = _stats(client, CACHED)
    h = httpclient.InferenceServerClient(server.http_url)
    try:
        tensors = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        tensors[0].set_data_from_numpy(a, binary_data=False)  # JSON numbers
        tensors[1].set_data_from_numpy(b, binary_data=True)
        result = h.infer(CACHED, tensors)
    finally:
        h.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert _delta(_stats(client, CACHED), before)["hit"] == 1


def test_the_clients_output_choices_apply_to_a_cached_answer(
    client: grpcclient.InferenceServerClient,
) -> None:
    a, b = _pair(4)
    _infer(client, CACHED, 4, outputs=["OUTPUT0"])
    before = _stats(client, CACHED)
    only_second = _infer(client, CACHED, 4, outputs=["OUTPUT1"])
    assert only_second.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(only_second.as_numpy("OUTPUT1"), a - b)
    top = client.infer(
        CACHED,
        _inputs(a, b),
        outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)],
    ).as_numpy("OUTPUT0")
    best = np.argsort(-(a + b)[0])[:2]
    assert top is not None
    assert [int(x.split(b":")[1]) for x in top[0]] == best.tolist()
    assert _delta(_stats(client, CACHED), before)["hit"] == 2


def test_a_cached_answer_is_written_to_a_shared_memory_output(
    client: grpcclient.InferenceServerClient,
) -> None:
    a, b = _pair(5)
    key = f"/meshserve_cache_test_{os.getpid()}"
    handle = shm.create_shared_memory_region("cache_out", key, 64)
    try:
        client.register_system_shared_memory("cache_out", key, 64)
        before = _stats(client, CACHED)
        for _ in range(2):
            shm.set_shared_memory_region(handle, [np.zeros((1, 16), np.int32)])
            out = grpcclient.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("cache_out", 64)
            client.infer(CACHED, _inputs(a, b), outputs=[out])
            got = shm.get_contents_as_numpy(handle, np.int32, [1, 16])
            np.testing.assert_array_equal(got, a + b)
        assert _delta(_stats(client, CACHED), before)["hit"] == 1
    finally:
        client.unregister_system_shared_memory("cache_out")
        shm.destroy_shared_memory_region(handle)


def test_a_failed_request_is_never_cached(client: grpcclient.InferenceServerClient) -> None:
    before = _stats(client, CACHED)
    bad = [grpcclient.InferInput(n, [1, 8], "INT32") for n in ("INPUT0", "INPUT1")]
    for tensor in bad:
        tensor.set_data_from_numpy(np.zeros((1, 8), np.int32))
    for _ in range(2):
        with pytest.raises(InferenceServerException, match="INPUT0") as err:
            client.infer(CACHED, bad)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    changes = _delta(_stats(client, CACHED), before)
    assert (changes["fail"], changes["hit"], changes["miss"]) == (2, 0, 0)
    a, b = _pair(6)
    np.testing.assert_array_equal(_infer(client, CACHED, 6).as_numpy("OUTPUT0"), a + b)


def test_a_model_without_response_cache_runs_every_request(
    client: grpcclient.InferenceServerClient,
) -> None:
    before = _stats(client, UNCACHED)
    for _ in range(3):
        _infer(client, UNCACHED, 7)
    changes = _delta(_stats(client, UNCACHED), before)
    assert (changes["inferences"], changes["hit"], changes["miss"]) == (3, 0, 0)


def test_unloading_forgets_the_models_entries(
    server: ServerThread, client: grpcclient.InferenceServerClient
) -> None:
    _infer(client, CACHED, 8)
    assert _metric(server, "nv_cache_num_entries") >= 1
    client.unload_model(CACHED)
    assert _metric(server, "nv_cache_num_entries") == 0
    client.load_model(CACHED)
    before = _stats(client, CACHED)
    a, b = _pair(8)
    np.testing.assert_array_equal(_infer(client, CACHED, 8).as_numpy("OUTPUT0"), a + b)
    changes = _delta(_stats(client, CACHED), before)
    assert (changes["hit"], changes["miss"]) == (0, 1)


def test_a_small_cache_evicts_the_least_recently_used(tmp_path: Path) -> None:
    running = _start(_repository(tmp_path), response_cache_bytes=2 * ENTRY_BYTES)
    c = grpcclient.InferenceServerClient(running.grpc_url)
    try:
        for seed in (10, 11, 10, 12):  # 10 is used again, so 11 is the one evicted for 12
            _infer(c, CACHED, seed)
        assert _metric(running, "nv_cache_num_evictions") == 1
        assert _metric(running, "nv_cache_util") == 1.0
        before = _stats(c, CACHED)
        _infer(c, CACHED, 10)
        _infer(c, CACHED, 11)
        changes = _delta(_stats(c, CACHED), before)
        assert (changes["hit"], changes["miss"]) == (1, 1)
    finally:
        c.close()
        running.stop()


def test_without_a_service_cache_the_model_runs_and_the_log_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="services.core.manager"):
        running = _start(_repository(tmp_path))
    c = grpcclient.InferenceServerClient(running.grpc_url)
    try:
        for _ in range(2):
            _infer(c, CACHED, 13)
        stats = _stats(c, CACHED)
        assert (stats["inferences"], stats["hit"], stats["miss"]) == (2, 0, 0)
        with urllib.request.urlopen(running.metrics_url, timeout=10) as r:
            assert "nv_cache_num_entries" not in r.read().decode()
    finally:
        c.close()
        running.stop()
    assert any(
        "response_cache is enabled but this service has no cache" in r.getMessage()
        and "--cache-config local,size=BYTES" in r.getMessage()
        for r in caplog.records
    )


_SLOW_MODEL = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(0.3)
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            if x[0] < 0:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("negative")))
            else:
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 2)]))
        return out
"""


def test_a_burst_of_one_request_runs_the_model_once(tmp_path: Path) -> None:
    """Identical requests that arrive while the first runs wait for its answer (hits); when the
    first fails, each runs and fails on its own. A Python model that takes 0.3 s an execution,
    no batching: without this every request of the burst would execute."""
    from concurrent.futures import ThreadPoolExecutor

    from services.python.runtime import PythonRuntime

    (tmp_path / "slow" / "1").mkdir(parents=True)
    (tmp_path / "slow" / "1" / "model.py").write_text(_SLOW_MODEL)
    (tmp_path / "slow" / "config.pbtxt").write_text(
        'name: "slow"\nbackend: "python"\n'
        'input [{ name: "IN", data_type: TYPE_FP32, dims: [1] }]\n'
        'output [{ name: "OUT", data_type: TYPE_FP32, dims: [1] }]\n'
        "instance_group [{ count: 4, kind: KIND_CPU }]\n"
        "response_cache { enable: true }\n"
    )
    with ServerThread(
        settings_for(tmp_path, response_cache_bytes=1 << 20), [PythonRuntime]
    ) as server:

        def once(value: float) -> float | str:
            with grpcclient.InferenceServerClient(server.grpc_url) as c:
                x = grpcclient.InferInput("IN", [1], "FP32")
                x.set_data_from_numpy(np.array([value], np.float32))
                try:
                    return float(c.infer("slow", [x]).as_numpy("OUT")[0])
                except InferenceServerException as exc:
                    return str(exc.message())

        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            before = _stats(c, "slow")
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(once, [1.5] * 6))
            assert answers == [3.0] * 6
            changes = _delta(_stats(c, "slow"), before)
            assert (changes["executions"], changes["miss"], changes["hit"]) == (1, 1, 5), changes

            before = _stats(c, "slow")
            with ThreadPoolExecutor(3) as pool:
                failures = list(pool.map(once, [-1.0] * 3))
            assert all(isinstance(f, str) and "negative" in f for f in failures), failures
            changes = _delta(_stats(c, "slow"), before)
            assert (changes["fail"], changes["hit"], changes["miss"]) == (3, 0, 0), changes
