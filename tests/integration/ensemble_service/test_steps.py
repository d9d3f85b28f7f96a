"""Ensembles of plain steps through the ensemble service: steps run in order, branches from one
input, only the requested outputs, HTTP clients, a failing step named with its model, bad input
refused before any step, invalid ensembles UNAVAILABLE with the step at fault, and the ensemble's
metadata, config and statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import ServerThread


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
