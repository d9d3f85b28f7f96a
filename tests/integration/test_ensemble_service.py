"""The ensemble service for real: tritonclient → ensemble service → steps on the ONNX service.

Here the ONNX service stands in for the gateway (``MESHSERVE_GATEWAY`` names its gRPC port): it
answers ModelInfer for its models exactly as the gateway would route them. Ensembles whose steps
span families, nested ensembles and cancellation through Envoy are in tests/e2e.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


def _write_ensemble(root: Path, text: str) -> None:
    name = text.split('"')[1]
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(text)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    from examples.build_repository import build_repository
    from services.ensemble.runtime import EnsembleRuntime
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("ensemble_models")
    build_repository(root, ["simple"])
    for text in (CHAIN, FORK, MISSING_VERSION, UNMAPPED):
        _write_ensemble(root, text)
    onnx = ServerThread(settings_for(root), [OnnxRuntime]).start()
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
        yield ensemble, root
    finally:
        ensemble.stop()
        onnx.stop()


@pytest.fixture
def client(servers: tuple[ServerThread, Path]) -> Iterator[grpcclient.InferenceServerClient]:
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


def test_http_client_reaches_the_ensemble(servers: tuple[ServerThread, Path]) -> None:
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
