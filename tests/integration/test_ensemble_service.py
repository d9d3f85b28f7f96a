"""The ensemble service for real: tritonclient → ensemble service → steps on the ONNX service.

Here one service with the ONNX and Python families stands in for the gateway
(``MESHSERVE_GATEWAY`` names its gRPC port): it answers ModelInfer and ModelStreamInfer for its
models exactly as the gateway would route them. Ensembles whose steps
span families, nested ensembles and cancellation through Envoy are in tests/e2e.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import ServerThread, settings_for

CHAIN = """name: "chain"
platform: "ensemble"
max_batch_size: 8
input [
  { name: "A" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "B" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "TWICE_A" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "TWICE_B" data_type: TYPE_INT32 dims: [ 16 ] }
]
ensemble_scheduling {
  step [
    {
      model_name: "simple"
      model_version: -1
      input_map { key: "INPUT0" value: "A" }
      input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT0" value: "SUM" }
      output_map { key: "OUTPUT1" value: "DIFF" }
    },
    {
      model_name: "simple"
      model_version: -1
      input_map { key: "INPUT0" value: "SUM" }
      input_map { key: "INPUT1" value: "DIFF" }
      output_map { key: "OUTPUT0" value: "TWICE_A" }
      output_map { key: "OUTPUT1" value: "TWICE_B" }
    }
  ]
}
"""

# Two branches from the same inputs: one adds, the other runs on swapped inputs.
FORK = """name: "fork"
platform: "ensemble"
max_batch_size: 8
input [
  { name: "A" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "B" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "A_MINUS_B" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "B_MINUS_A" data_type: TYPE_INT32 dims: [ 16 ] }
]
ensemble_scheduling {
  step [
    {
      model_name: "simple"
      input_map { key: "INPUT0" value: "A" }
      input_map { key: "INPUT1" value: "B" }
      output_map { key: "OUTPUT1" value: "A_MINUS_B" }
    },
    {
      model_name: "simple"
      input_map { key: "INPUT0" value: "B" }
      input_map { key: "INPUT1" value: "A" }
      output_map { key: "OUTPUT1" value: "B_MINUS_A" }
    }
  ]
}
"""

# Loads (the model exists) but its step asks for a version the ONNX service does not have.
MISSING_VERSION = CHAIN.replace('"chain"', '"missing_version"').replace(
    'model_version: -1\n      input_map { key: "INPUT0" value: "SUM" }',
    'model_version: 7\n      input_map { key: "INPUT0" value: "SUM" }',
)

# Fails to load: step 1 reads a tensor nobody writes.
UNMAPPED = CHAIN.replace('"chain"', '"unmapped"').replace(
    'input_map { key: "INPUT1" value: "DIFF" }', 'input_map { key: "INPUT1" value: "NOPE" }'
)


# Fails to load: an unknown step_routing parameter.
BAD_ROUTING = CHAIN.replace('"chain"', '"bad_routing"') + (
    'parameters { key: "step_routing" value: { string_value: "carrier_pigeon" } }\n'
)


def _write_decoupled_models(root: Path) -> None:
    """``repeat_then_simple`` (examples/build_ensemble.py) and its steps, and a slow copy
    (``slow_repeat_then_simple``: a response every 200 ms) for cancellation."""
    from examples.build_ensemble import ENSEMBLES
    from examples.build_python import build_python_repository

    build_python_repository(root, ["repeat_count_python"])
    example = ENSEMBLES["repeat_then_simple"].config()
    _write_ensemble(root, example)
    slow = root / "slow_repeat_count_python"
    (slow / "1").mkdir(parents=True)
    (slow / "1" / "model.py").write_text(
        (root / "repeat_count_python" / "1" / "model.py").read_text()
    )
    (slow / "config.pbtxt").write_text(
        (root / "repeat_count_python" / "config.pbtxt")
        .read_text()
        .replace('"repeat_count_python"', '"slow_repeat_count_python"')
        .replace('string_value: "0"', 'string_value: "200"')
    )
    _write_ensemble(
        root,
        example.replace('"repeat_then_simple"', '"slow_repeat_then_simple"').replace(
            '"repeat_count_python"', '"slow_repeat_count_python"'
        ),
    )


def _write_ensemble(root: Path, text: str) -> None:
    name = text.split('"')[1]
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(text)


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerThread, Path, ServerThread]]:
    from examples.build_repository import build_repository
    from services.ensemble.runtime import EnsembleRuntime
    from services.onnx.runtime import OnnxRuntime
    from services.python.runtime import PythonRuntime

    root = tmp_path_factory.mktemp("ensemble_models")
    build_repository(root, ["simple"])
    for text in (CHAIN, FORK, MISSING_VERSION, UNMAPPED, BAD_ROUTING):
        _write_ensemble(root, text)
    _write_decoupled_models(root)
    onnx = ServerThread(settings_for(root), [OnnxRuntime, PythonRuntime]).start()
    saved = os.environ.get("MESHSERVE_GATEWAY")
    os.environ["MESHSERVE_GATEWAY"] = onnx.grpc_url
    try:
        ensemble = ServerThread(settings_for(root), [EnsembleRuntime]).start()
    except BaseException:
        onnx.stop()
        raise
    finally:
        if saved is None:
            os.environ.pop("MESHSERVE_GATEWAY", None)
        else:
            os.environ["MESHSERVE_GATEWAY"] = saved
    try:
        yield ensemble, root, onnx
    finally:
        ensemble.stop()
        onnx.stop()


@pytest.fixture
def client(
    servers: tuple[ServerThread, Path, ServerThread],
) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(servers[0].grpc_url) as c:
        yield c


def _inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    ins = []
    for name, arr in (("A", a), ("B", b)):
        i = grpcclient.InferInput(name, list(arr.shape), "INT32")
        i.set_data_from_numpy(arr)
        ins.append(i)
    return ins


def _ab(batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    a = rng.integers(-1000, 1000, (batch, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, (batch, 16), dtype=np.int32)
    return a, b


def test_chain_runs_steps_in_order(client: grpcclient.InferenceServerClient) -> None:
    a, b = _ab(3)
    result = client.infer("chain", _inputs(a, b), request_id="r-1")
    # step 0: SUM = a + b, DIFF = a - b; step 1: SUM + DIFF = 2a, SUM - DIFF = 2b
    np.testing.assert_array_equal(result.as_numpy("TWICE_A"), 2 * a)
    np.testing.assert_array_equal(result.as_numpy("TWICE_B"), 2 * b)
    assert result.get_response().id == "r-1"


def test_branches_from_one_input(client: grpcclient.InferenceServerClient) -> None:
    a, b = _ab()
    result = client.infer("fork", _inputs(a, b))
    np.testing.assert_array_equal(result.as_numpy("A_MINUS_B"), a - b)
    np.testing.assert_array_equal(result.as_numpy("B_MINUS_A"), b - a)


def test_requested_output_only(client: grpcclient.InferenceServerClient) -> None:
    a, b = _ab()
    result = client.infer(
        "chain", _inputs(a, b), outputs=[grpcclient.InferRequestedOutput("TWICE_B")]
    )
    np.testing.assert_array_equal(result.as_numpy("TWICE_B"), 2 * b)
    assert result.as_numpy("TWICE_A") is None


def test_http_client_reaches_the_ensemble(servers: tuple[ServerThread, Path, ServerThread]) -> None:
    a, b = _ab()
    with httpclient.InferenceServerClient(servers[0].http_url) as c:
        ins = []
        for name, arr in (("A", a), ("B", b)):
            i = httpclient.InferInput(name, list(arr.shape), "INT32")
            i.set_data_from_numpy(arr, binary_data=True)
            ins.append(i)
        result = c.infer("chain", ins)
    np.testing.assert_array_equal(result.as_numpy("TWICE_A"), 2 * a)


def test_failing_step_names_the_step_and_model(client: grpcclient.InferenceServerClient) -> None:
    a, b = _ab()
    with pytest.raises(InferenceServerException) as err:
        client.infer("missing_version", _inputs(a, b))
    assert "step 1 (model 'simple')" in err.value.message()
    assert "missing_version" in err.value.message()
    # the step's own status comes through (unknown version)
    assert err.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")
    # and the service keeps serving
    assert client.infer("chain", _inputs(a, b)).as_numpy("TWICE_A") is not None


def test_bad_input_is_rejected_before_any_step(client: grpcclient.InferenceServerClient) -> None:
    i = grpcclient.InferInput("A", [1, 15], "INT32")
    i.set_data_from_numpy(np.zeros((1, 15), np.int32))
    j = grpcclient.InferInput("B", [1, 16], "INT32")
    j.set_data_from_numpy(np.zeros((1, 16), np.int32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("chain", [i, j])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_invalid_ensemble_is_unavailable_with_the_step(
    client: grpcclient.InferenceServerClient,
) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["unmapped"].state == "UNAVAILABLE"
    assert "step 1 (model 'simple') reads tensor 'NOPE'" in index["unmapped"].reason
    assert index["chain"].state == "READY"
    assert index["bad_routing"].state == "UNAVAILABLE"
    assert (
        "step_routing is 'carrier_pigeon'; use one of mesh, gateway" in index["bad_routing"].reason
    )
    assert "simple" not in index  # the ONNX model is the other service's
    with pytest.raises(InferenceServerException) as err:
        client.infer("unmapped", _inputs(*_ab()))
    assert err.value.status() == "StatusCode.UNAVAILABLE"


def test_ensemble_metadata_config_and_statistics(
    client: grpcclient.InferenceServerClient,
) -> None:
    meta = client.get_model_metadata("chain")
    assert meta.platform == "ensemble"
    assert [i.name for i in meta.inputs] == ["A", "B"]
    config = client.get_model_config("chain").config
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["simple", "simple"]
    before = client.get_inference_statistics("chain").model_stats[0].inference_stats.success.count
    client.infer("chain", _inputs(*_ab(4)))
    stats = client.get_inference_statistics("chain").model_stats[0]
    assert stats.inference_stats.success.count == before + 1
    assert stats.inference_count >= 4


# --- a decoupled step: one ensemble response per response of the step -------------------------


class _Stream:
    """A tritonclient stream to the ensemble service whose callbacks land in a queue."""

    def __init__(self, url: str) -> None:
        client = grpcclient.InferenceServerClient(url)
        self.client: grpcclient.InferenceServerClient | None = client
        self.results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, model: str, x: np.ndarray, count: int, request_id: str = "") -> None:
        counts = np.full((x.shape[0], 1), count, dtype=np.uint32)
        tensors = []
        for name, arr, datatype in (("INPUT0", x, "INT32"), ("COUNT", counts, "UINT32")):
            tensor = grpcclient.InferInput(name, list(arr.shape), datatype)
            tensor.set_data_from_numpy(arr)
            tensors.append(tensor)
        assert self.client is not None
        self.client.async_stream_infer(
            model, tensors, request_id=request_id, enable_empty_final_response=True
        )

    def until_final(self) -> list[Any]:
        """Every response up to the one flagged final (raises on an error)."""
        responses = []
        while True:
            result, error = self.results.get(timeout=10)
            if error is not None:
                raise error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses

    def close(self) -> None:
        if self.client is not None:
            self.client.stop_stream(cancel_requests=True)
            self.client.close()
            self.client = None


@pytest.fixture
def stream(servers: tuple[ServerThread, Path, ServerThread]) -> Iterator[_Stream]:
    s = _Stream(servers[0].grpc_url)
    try:
        yield s
    finally:
        s.close()


def _x(batch: int = 1) -> np.ndarray:
    return np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)


def test_each_decoupled_response_runs_the_next_step(stream: _Stream) -> None:
    x = _x(2)
    stream.send("repeat_then_simple", x, 3, request_id="d-1")
    responses = stream.until_final()
    with_data = [r for r in responses if r.as_numpy("OUTPUT0") is not None]
    assert len(with_data) == 3
    assert all(r.get_response().id == "d-1" for r in responses)
    # response k: simple(x, k) = (x + k, x - k); the order is the order the simple calls ended
    ks = sorted(int((r.as_numpy("OUTPUT0") - x)[0, 0]) for r in with_data)
    assert ks == [0, 1, 2]
    for r in with_data:
        k = int((r.as_numpy("OUTPUT0") - x)[0, 0])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x + k)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - k)
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in responses]
    assert finals.count(True) == 1 and finals[-1]


def test_no_response_from_the_step_gives_only_the_final_flag(stream: _Stream) -> None:
    stream.send("repeat_then_simple", _x(), 0)
    (only,) = stream.until_final()
    assert only.as_numpy("OUTPUT0") is None


def test_decoupled_ensemble_is_streaming_only(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("repeat_then_simple").config
    # filled in at load from the step (the file does not say it), as Triton does
    assert config.model_transaction_policy.decoupled
    assert not client.get_model_config("chain").config.model_transaction_policy.decoupled
    with pytest.raises(InferenceServerException) as err:
        x = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        x.set_data_from_numpy(_x())
        n = grpcclient.InferInput("COUNT", [1, 1], "UINT32")
        n.set_data_from_numpy(np.ones((1, 1), np.uint32))
        client.infer("repeat_then_simple", [x, n])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "ModelStreamInfer" in err.value.message()


def test_failing_decoupled_step_names_the_step(stream: _Stream) -> None:
    stream.send("repeat_then_simple", _x(), 100)
    with pytest.raises(InferenceServerException) as err:
        stream.until_final()
    message = err.value.message()
    assert "ensemble 'repeat_then_simple' step 0 (model 'repeat_count_python')" in message
    assert "COUNT is 100" in message
    # the stream and the service go on
    stream.send("repeat_then_simple", _x(), 1)
    responses = stream.until_final()
    assert [r.as_numpy("OUTPUT0") is not None for r in responses].count(True) == 1


def test_cancelling_the_stream_stops_the_decoupled_step(
    servers: tuple[ServerThread, Path, ServerThread], stream: _Stream
) -> None:
    """A response every 200 ms, 20 asked for: cancelled after the first, the step's stream is
    cancelled too (the model sees it and stops), so ``simple`` is not called 20 times."""
    with grpcclient.InferenceServerClient(servers[2].grpc_url) as steps:

        def simple_calls() -> int:
            stats = steps.get_inference_statistics("simple").model_stats
            return sum(s.inference_stats.success.count for s in stats)

        before = simple_calls()
        stream.send("slow_repeat_then_simple", _x(), 20)
        first, error = stream.results.get(timeout=10)
        assert error is None and first.as_numpy("OUTPUT0") is not None
        stream.close()
        time.sleep(1.0)  # five more responses' time, were the step still running
        assert simple_calls() - before <= 2
