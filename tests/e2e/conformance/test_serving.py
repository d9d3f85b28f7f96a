"""Conformance of each family's add/sub model through the gateway: metadata and config,
inference over gRPC and HTTP, tensors in system shared memory, batching (where the model
batches), bad input (wrong datatype, wrong
shape) with the server still serving, statistics, metrics, and explicit unload/load through the
gateway. Each test runs once per family (tests/e2e/conformance/families.py).
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.e2e.conformance.families import ON_GPU, Family, family_param, need
from tests.e2e.conftest import MeshHandle, wait_for


def grpc_inputs(
    family: Family, value: int
) -> tuple[list[grpcclient.InferInput], np.ndarray, np.ndarray]:
    a, b = family.arrays(value)
    ins = [grpcclient.InferInput(n, list(a.shape), family.datatype) for n in family.inputs]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    return ins, a + b, a - b


@pytest.mark.parametrize("family", family_param())
def test_metadata_and_config(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    h = httpclient.InferenceServerClient(mesh.http_url)
    try:
        batch = [-1] if family.batched else []
        meta = c.get_model_metadata(family.model, as_json=True)
        assert [
            (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]
        ] == [(n, family.datatype, [*batch, *family.dims]) for n in family.inputs]
        assert {t["name"] for t in h.get_model_metadata(family.model)["outputs"]} == set(
            family.outputs
        )
        config = h.get_model_config(family.model)
        assert config["name"] == family.model
        assert (config["max_batch_size"] > 0) == family.batched
        if family.name in ON_GPU:  # READY on KIND_GPU: the service found a CUDA device for it
            assert [g["kind"] for g in config["instance_group"]] == ["KIND_GPU"]
        assert c.is_model_ready(family.model) and h.is_model_ready(family.model)
    finally:
        c.close()
        h.close()


@pytest.mark.parametrize("family", family_param())
def test_infer_over_grpc_and_http(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    h = httpclient.InferenceServerClient(mesh.http_url)
    try:
        ins, total, diff = grpc_inputs(family, 3)
        r = c.infer(family.model, ins)
        np.testing.assert_array_equal(r.as_numpy(family.outputs[0]), total)
        np.testing.assert_array_equal(r.as_numpy(family.outputs[1]), diff)
        a, b = family.arrays(5)
        hins = [httpclient.InferInput(n, list(a.shape), family.datatype) for n in family.inputs]
        hins[0].set_data_from_numpy(a, binary_data=True)
        hins[1].set_data_from_numpy(b, binary_data=False)
        hr = h.infer(family.model, hins)
        np.testing.assert_array_equal(hr.as_numpy(family.outputs[0]), a + b)
    finally:
        c.close()
        h.close()


@pytest.mark.parametrize("family", family_param())
def test_inputs_and_an_output_in_shared_memory(mesh: MeshHandle, family: Family) -> None:
    """A region registered at the gateway: both inputs read from it, the first output written
    into it, the second output in the response, over gRPC and HTTP."""
    need(family)
    a, b = family.arrays(3)
    size = a.nbytes
    key = f"/meshserve_conformance_{family.name}_{os.getpid()}"
    handle = shm.create_shared_memory_region("conformance", key, 3 * size)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    h = httpclient.InferenceServerClient(mesh.http_url)
    try:
        shm.set_shared_memory_region(handle, [a, b])
        for client, module in ((c, grpcclient), (h, httpclient)):
            shm.set_shared_memory_region(handle, [np.zeros_like(a)], offset=2 * size)
            client.register_system_shared_memory("conformance", key, 3 * size)
            try:
                ins = [module.InferInput(n, list(a.shape), family.datatype) for n in family.inputs]
                ins[0].set_shared_memory("conformance", size)
                ins[1].set_shared_memory("conformance", size, offset=size)
                outs = [module.InferRequestedOutput(n) for n in family.outputs]
                outs[0].set_shared_memory("conformance", size, offset=2 * size)
                result = client.infer(family.model, ins, outputs=outs)
                written = shm.get_contents_as_numpy(handle, a.dtype, a.shape, offset=2 * size)
                np.testing.assert_array_equal(written, a + b)
                np.testing.assert_array_equal(result.as_numpy(family.outputs[1]), a - b)
            finally:
                client.unregister_system_shared_memory("conformance")
    finally:
        c.close()
        h.close()
        shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("family", family_param())
def test_concurrent_requests_are_batched(mesh: MeshHandle, family: Family) -> None:
    need(family)
    if not family.batched:
        pytest.skip(f"{family.model} has max_batch_size 0: its requests run one by one")
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        before = c.get_inference_statistics(family.model, as_json=True)["model_stats"][0]
        errors: list[BaseException] = []

        def caller() -> None:
            client = grpcclient.InferenceServerClient(mesh.grpc_url)
            try:
                for _ in range(10):
                    ins, total, _ = grpc_inputs(family, 1)
                    np.testing.assert_array_equal(
                        client.infer(family.model, ins).as_numpy(family.outputs[0]), total
                    )
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=caller) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        after = c.get_inference_statistics(family.model, as_json=True)["model_stats"][0]
        inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
        executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
        assert inferences == 120
        assert executions < inferences
    finally:
        c.close()


@pytest.mark.parametrize("family", family_param())
def test_bad_input_is_refused_and_the_model_keeps_serving(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        a, _ = family.arrays(1)
        wrong_type = "FP64" if family.datatype != "FP64" else "INT32"
        bad = [grpcclient.InferInput(n, list(a.shape), wrong_type) for n in family.inputs]
        for i in bad:
            i.set_data_from_numpy(a.astype(np.float64 if wrong_type == "FP64" else np.int32))
        with pytest.raises(InferenceServerException) as info:
            c.infer(family.model, bad)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert wrong_type in info.value.message() and family.datatype in info.value.message()
        shape = [*a.shape[:-1], a.shape[-1] + 1]
        bad = [grpcclient.InferInput(n, shape, family.datatype) for n in family.inputs]
        for i in bad:
            i.set_data_from_numpy(np.zeros(shape, dtype=a.dtype))
        with pytest.raises(InferenceServerException) as info:
            c.infer(family.model, bad)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert family.inputs[0] in info.value.message()
        ins, total, _ = grpc_inputs(family, 2)
        np.testing.assert_array_equal(c.infer(family.model, ins).as_numpy(family.outputs[0]), total)
    finally:
        c.close()


@pytest.mark.parametrize("family", family_param())
def test_statistics_and_metrics(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        before = c.get_inference_statistics(family.model, as_json=True)["model_stats"][0]
        for _ in range(3):
            c.infer(family.model, grpc_inputs(family, 1)[0])
        after = c.get_inference_statistics(family.model, as_json=True)["model_stats"][0]
        success = lambda s: int(s.get("inference_stats", {}).get("success", {}).get("count", 0))  # noqa: E731
        assert success(after) - success(before) == 3
        assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0
        url = f"http://{mesh.settings.host}:{mesh.settings.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert any(
            line.startswith("nv_inference_request_success{") and f'model="{family.model}"' in line
            for line in text.splitlines()
        )
    finally:
        c.close()


@pytest.mark.parametrize("family", family_param())
def test_unload_then_load_through_the_gateway(mesh: MeshHandle, family: Family) -> None:
    need(family)
    c = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        c.unload_model(family.model)
        wait_for(lambda: not c.is_model_ready(family.model), 15, f"{family.model} unloaded")
        # Right after an unload Envoy may answer "no healthy upstream", or still route to the
        # service, which answers UNAVAILABLE (the model is unloaded there), for a moment while
        # the new config arrives (known transients); the settled answer is the front's NOT_FOUND.
        unloaded_at = time.monotonic()

        def settled_error() -> InferenceServerException | None:
            try:
                c.infer(family.model, grpc_inputs(family, 1)[0])
            except InferenceServerException as exc:
                if exc.status() == "StatusCode.UNAVAILABLE":
                    return None
                return exc if family.model in exc.message() else None
            raise AssertionError(f"{family.model} still answered after its unload")

        error = wait_for(settled_error, 15, f"{family.model}: NOT_FOUND after unload")
        assert error.status() == "StatusCode.NOT_FOUND", error
        print(f"{family.name}: settled {time.monotonic() - unloaded_at:.2f} s after unload")
        c.load_model(family.model)
        start = time.monotonic()

        def ready() -> bool:
            try:
                return bool(c.is_model_ready(family.model))
            except InferenceServerException as exc:  # the gateway's cluster is still warming
                if exc.status() != "StatusCode.UNAVAILABLE":
                    raise
                return False

        wait_for(ready, 15, f"{family.model} loaded")

        def serves() -> bool:
            try:
                ins, total, _ = grpc_inputs(family, 1)
                return bool(
                    np.array_equal(c.infer(family.model, ins).as_numpy(family.outputs[0]), total)
                )
            except InferenceServerException:
                return False

        wait_for(serves, 15, f"{family.model} answering after load")
        assert time.monotonic() - start < 15
    finally:
        c.close()
