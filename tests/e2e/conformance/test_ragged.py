"""Ragged batching through the gateway: each family's ragged model (``Family.ragged``: FP32
values of any length, ``allow_ragged_batch``, a batch input the server builds and a scattered
output) answers concurrent requests of different lengths, each with its own sum and its values
doubled in its own shape, over gRPC and HTTP, in fewer executions than requests."""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.conformance.families import Family, family_param, need
from tests.e2e.conftest import MeshHandle

THREADS = 6
CALLS = 8


def ragged(family: Family) -> Family:
    need(family)
    if not family.ragged:
        pytest.skip(f"{family.name}: requests reach its models one by one; nothing to batch")
    return family


def _call(module: Any, client: Any, family: Family, length: int) -> None:
    values, sums, scaled = family.ragged_io
    x = np.random.default_rng(length).random((1, length), dtype=np.float32)
    tensor = module.InferInput(values, [1, length], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(family.ragged, [tensor])
    np.testing.assert_allclose(result.as_numpy(sums), x.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy(scaled), 2 * x)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("family", family_param())
def test_requests_of_different_lengths_share_batches(
    mesh: MeshHandle, family: Family, protocol: str
) -> None:
    family = ragged(family)
    module: Any = grpcclient if protocol == "grpc" else httpclient
    url = mesh.grpc_url if protocol == "grpc" else mesh.http_url
    with grpcclient.InferenceServerClient(mesh.grpc_url) as stats:
        before = stats.get_inference_statistics(family.ragged, as_json=True)["model_stats"][0]
    errors: list[BaseException] = []
    rng = random.Random(7)
    lengths = [rng.randint(1, 40) for _ in range(THREADS * CALLS)]

    def caller(mine: list[int]) -> None:
        client = module.InferenceServerClient(url)
        try:
            for length in mine:
                _call(module, client, family, length)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=caller, args=(lengths[i::THREADS],)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    with grpcclient.InferenceServerClient(mesh.grpc_url) as stats:
        after = stats.get_inference_statistics(family.ragged, as_json=True)["model_stats"][0]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == THREADS * CALLS
    assert executions < inferences, f"{executions} executions for {inferences} requests"
