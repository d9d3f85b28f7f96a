"""The whole mesh through Envoy: routing with no client header, splits, big and compressed bodies.

One mesh for the module (``deploy.supervisor.Mesh``: control plane, Envoy, one ONNX service
serving ``simple`` versions 1 and 2, the ensemble service with ``chain3`` on ``simple``) plus a second ONNX service process serving
``simple_string`` and ``simple_identity``, so requests reach two different processes. Every call
goes to the gateway's ports with stock tritonclient and no extra header, unless a test is about
headers.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from examples.build_ensemble import build_ensemble_repository, write_gateway_routed_copy
from tests.e2e.conftest import (
    MeshHandle,
    ServiceProcess,
    make_repository,
    running_mesh,
    running_service,
)
from tests.e2e.envoy_stats import gateway_requests_to
from tests.e2e.traffic import Load, simple_inputs

STRING_A = [str(i) for i in range(16)]
STRING_B = ["2"] * 16


@pytest.fixture(scope="module")
def mesh(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshHandle]:
    tmp = tmp_path_factory.mktemp("mesh")
    repo = make_repository(example_repo, tmp / "models", ["simple"], simple_versions=2)
    # chain3 (simple three times): its steps follow the gateway's routes, splits included; a
    # copy whose steps go through the gateway itself (step_routing: gateway)
    build_ensemble_repository(repo, ["chain3"], steps=False)
    write_gateway_routed_copy(repo, "chain3")
    with running_mesh(repo, tmp) as handle:
        yield handle


@pytest.fixture(scope="module")
def second_service(
    mesh: MeshHandle, example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("second")
    repo = make_repository(example_repo, tmp / "models", ["simple_string", "simple_identity"])
    with running_service(repo, mesh, tmp, models=2) as service:
        yield service


@pytest.fixture
def grpc_client(mesh: MeshHandle) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def http_client(mesh: MeshHandle) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(mesh.http_url, network_timeout=60)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def no_split(mesh: MeshHandle) -> Iterator[None]:
    """The test may split ``simple``; the split is cleared afterwards, whatever happened."""
    try:
        yield
    finally:
        mesh.clear_split("simple")


def _string_inputs(module: type) -> list:
    inputs = [module.InferInput(n, [1, 16], "BYTES") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(np.array([STRING_A], dtype=object))
    inputs[1].set_data_from_numpy(np.array([STRING_B], dtype=object))
    return inputs


def _string_sum(result: grpcclient.InferResult | httpclient.InferResult) -> list[int]:
    return [int(x) for x in result.as_numpy("OUTPUT0")[0]]


def _owners(mesh: MeshHandle) -> dict[str, str]:
    doc = mesh.status()
    assert doc is not None
    return {m["name"]: i["id"] for i in doc["instances"] for m in i["models"]}


def test_models_of_two_services_over_grpc(
    mesh: MeshHandle, second_service: ServiceProcess, grpc_client: grpcclient.InferenceServerClient
) -> None:
    owners = _owners(mesh)
    assert owners["simple_string"] == owners["simple_identity"] == second_service.id
    assert owners["simple"] != second_service.id

    c = grpc_client
    assert c.is_server_live()
    assert c.is_server_ready()
    inputs, expected = simple_inputs(2)
    assert np.array_equal(c.infer("simple", inputs).as_numpy("OUTPUT0"), expected)
    result = c.infer("simple_string", _string_inputs(grpcclient))
    assert _string_sum(result) == [i + 2 for i in range(16)]

    for name in ("simple", "simple_string"):
        assert c.is_model_ready(name)
        assert c.get_model_metadata(name).name == name
        assert c.get_model_config(name).config.name == name
        stats = c.get_inference_statistics(name).model_stats
        assert {s.name for s in stats} == {name}
        assert sum(s.inference_count for s in stats) >= 1
    index = {(m.name, m.version) for m in c.get_model_repository_index().models}
    assert {("simple", "1"), ("simple", "2"), ("simple_string", "1")} <= index


def test_models_of_two_services_over_http(
    mesh: MeshHandle, second_service: ServiceProcess, http_client: httpclient.InferenceServerClient
) -> None:
    c = http_client
    assert c.is_server_live()
    assert c.is_server_ready()
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(a)
    assert np.array_equal(c.infer("simple", inputs).as_numpy("OUTPUT0"), a + a)
    result = c.infer("simple_string", _string_inputs(httpclient))
    assert _string_sum(result) == [i + 2 for i in range(16)]

    for name in ("simple", "simple_string"):
        assert c.is_model_ready(name)
        assert c.get_model_metadata(name)["name"] == name
        assert c.get_model_config(name)["name"] == name
        stats = c.get_inference_statistics(name)["model_stats"]
        assert {s["name"] for s in stats} == {name}
        assert sum(s["inference_count"] for s in stats) >= 1


def test_unknown_model_is_not_found_from_the_gateway(
    mesh: MeshHandle,
    grpc_client: grpcclient.InferenceServerClient,
    http_client: httpclient.InferenceServerClient,
) -> None:
    inputs, _ = simple_inputs()
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("no_such_model", inputs, client_timeout=10)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        http_client.get_model_metadata("no_such_model")
    assert info.value.status() == "404"
    assert "no_such_model" in info.value.message()
    # a 1 MB name: still NOT_FOUND, the message cut to what gRPC trailers carry (echoed
    # whole, the client or Envoy would refuse the answer)
    with pytest.raises(InferenceServerException) as info:
        grpc_client.infer("n" * (1 << 20), inputs, client_timeout=10)
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert f"nnn... (message cut: {(1 << 20) + 16} characters)" in info.value.message()


def test_split_90_10_over_1000_requests(
    mesh: MeshHandle, no_split: None, grpc_client: grpcclient.InferenceServerClient
) -> None:
    mesh.set_split("simple", {"1": 90, "2": 10})
    inputs, expected = simple_inputs()
    counts: Counter[str] = Counter()
    for _ in range(1000):
        result = grpc_client.infer("simple", inputs, client_timeout=10)
        assert np.array_equal(result.as_numpy("OUTPUT0"), expected)
        counts[result.get_response().model_version] += 1
    assert set(counts) == {"1", "2"}
    assert 870 <= counts["1"] <= 930, counts  # 90 % ± 3 points

    # a request naming a version bypasses the split, by body field or by header
    named = {grpc_client.infer("simple", inputs, model_version="2").get_response().model_version}
    by_header = {
        grpc_client.infer(
            "simple", inputs, headers={"meshserve-model": "simple", "meshserve-version": "2"}
        )
        .get_response()
        .model_version
        for _ in range(20)
    }
    assert named == by_header == {"2"}


def _served(client: grpcclient.InferenceServerClient, version: str) -> int:
    stats = client.get_inference_statistics("simple", version).model_stats
    return sum(s.inference_stats.success.count for s in stats)


def test_ensemble_steps_follow_the_split(
    mesh: MeshHandle, no_split: None, grpc_client: grpcclient.InferenceServerClient
) -> None:
    """The ensemble service routes its steps by the gateway's routes (read over ADS, not through
    the gateway): each split decides which version of ``simple`` runs all three steps."""
    inputs, expected = simple_inputs()
    for weights, served_by in (({"1": 100, "2": 0}, "1"), ({"1": 0, "2": 100}, "2")):
        mesh.set_split("simple", weights)
        before = {v: _served(grpc_client, v) for v in ("1", "2")}
        for _ in range(10):
            result = grpc_client.infer("chain3", inputs, client_timeout=10)
            assert np.array_equal(result.as_numpy("OUTPUT0"), 2 * expected)
        after = {v: _served(grpc_client, v) for v in ("1", "2")}
        other = "2" if served_by == "1" else "1"
        assert after[served_by] - before[served_by] == 30, (weights, before, after)
        assert after[other] == before[other], (weights, before, after)


def test_steps_skip_the_gateway_unless_the_ensemble_asks_for_it(
    mesh: MeshHandle, grpc_client: grpcclient.InferenceServerClient
) -> None:
    inputs, expected = simple_inputs()
    for model, through_envoy in (("chain3", 0), ("chain3_via_gateway", 3 * 5)):
        before = gateway_requests_to(mesh, "simple")
        for _ in range(5):
            result = grpc_client.infer(model, inputs, client_timeout=10)
            assert np.array_equal(result.as_numpy("OUTPUT0"), 2 * expected)
        assert gateway_requests_to(mesh, "simple") - before == through_envoy, model


def test_weights_change_under_load_without_failures(mesh: MeshHandle, no_split: None) -> None:
    phases = [{"1": 100, "2": 0}, {"1": 0, "2": 100}, {"1": 50, "2": 50}]
    seen: list[Counter[str]] = []
    with Load(mesh.grpc_url, threads=8) as load:
        for weights in phases:
            mesh.set_split("simple", weights)
            start = time.monotonic()
            time.sleep(1.0)
            seen.append(Counter(v for t, v in load.snapshot().ok if t > start + 0.2))
    result = load.snapshot()
    assert result.failed == [], result.failed[:5]
    assert len(result.ok) > 200, len(result.ok)
    # once a phase's snapshot was ACKed (and calls in flight finished), only its versions serve
    assert set(seen[0]) == {"1"}, seen
    assert set(seen[1]) == {"2"}, seen
    assert set(seen[2]) == {"1", "2"}, seen


def test_64_mib_request_passes_the_gateway(
    second_service: ServiceProcess,
    grpc_client: grpcclient.InferenceServerClient,
    http_client: httpclient.InferenceServerClient,
) -> None:
    payload = np.array([[b"x" * (64 * 1024 * 1024)]], dtype=object)
    g_input = grpcclient.InferInput("INPUT0", [1, 1], "BYTES")
    g_input.set_data_from_numpy(payload)
    out = grpc_client.infer("simple_identity", [g_input], client_timeout=60).as_numpy("OUTPUT0")
    assert out.shape == (1, 1) and len(out[0][0]) == 64 * 1024 * 1024

    h_input = httpclient.InferInput("INPUT0", [1, 1], "BYTES")
    h_input.set_data_from_numpy(payload, binary_data=True)
    out = http_client.infer("simple_identity", [h_input]).as_numpy("OUTPUT0")
    assert out.shape == (1, 1) and len(out[0][0]) == 64 * 1024 * 1024


def test_shared_memory_tensors_through_the_gateway(
    second_service: ServiceProcess,
    grpc_client: grpcclient.InferenceServerClient,
    http_client: httpclient.InferenceServerClient,
) -> None:
    """A region registered at the gateway reaches the service behind it: inputs read from it and
    an output written into it, over gRPC and HTTP; once unregistered, a request naming it fails
    with the region's name and a plain request still works."""
    key = f"/meshserve_e2e_{os.getpid()}"
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    handle = shm.create_shared_memory_region("e2e_region", key, 192)
    try:
        shm.set_shared_memory_region(handle, [a, b])  # INPUT0 at 0, INPUT1 at 64, OUTPUT0 at 128
        for client, module in ((grpc_client, grpcclient), (http_client, httpclient)):
            shm.set_shared_memory_region(handle, [np.zeros((1, 16), np.int32)], offset=128)
            client.register_system_shared_memory("e2e_region", key, 192)
            inputs = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            inputs[0].set_shared_memory("e2e_region", 64)
            inputs[1].set_shared_memory("e2e_region", 64, offset=64)
            output = module.InferRequestedOutput("OUTPUT0")
            output.set_shared_memory("e2e_region", 64, offset=128)
            try:
                client.infer("simple", inputs, outputs=[output])
                written = shm.get_contents_as_numpy(handle, np.int32, [1, 16], offset=128)
                assert np.array_equal(written, a + b), module.__name__
            finally:
                client.unregister_system_shared_memory("e2e_region")
            with pytest.raises(InferenceServerException) as info:
                client.infer("simple", inputs)
            assert "e2e_region" in info.value.message()
        plain, expected = simple_inputs(4)
        assert np.array_equal(grpc_client.infer("simple", plain).as_numpy("OUTPUT0"), expected)
    finally:
        shm.destroy_shared_memory_region(handle)


def test_gzip_compressed_grpc_reaches_its_model(
    second_service: ServiceProcess, grpc_client: grpcclient.InferenceServerClient
) -> None:
    inputs, expected = simple_inputs(5)
    result = grpc_client.infer("simple", inputs, compression_algorithm="gzip", client_timeout=10)
    assert np.array_equal(result.as_numpy("OUTPUT0"), expected)
    result = grpc_client.infer(
        "simple_string", _string_inputs(grpcclient), compression_algorithm="gzip"
    )
    assert _string_sum(result) == [i + 2 for i in range(16)]


def test_an_overflowing_split_never_reaches_envoy_and_traffic_is_unaffected(
    mesh: MeshHandle, no_split: None, grpc_client: grpcclient.InferenceServerClient
) -> None:
    """Weights each within uint32 but adding up past it would be NACKed by Envoy ("The sum of
    weights ... exceeds 4294967295"): the policy API refuses it first, so the gateway records no
    rejection and traffic stays on the last good split. (A NACK itself, and Envoy keeping its
    last good config, is tested against a real Envoy in tests/integration/test_envoy_ads.py.)"""
    mesh.set_split("simple", {"1": 0, "2": 100})
    code, doc = mesh.api("PUT", "splits/simple", {"weights": {"1": 2**32 - 1, "2": 1}})
    assert code == 400 and "more than Envoy accepts" in doc["error"], doc
    status = mesh.status()
    assert status is not None
    assert all(not t["error"] for g in status["gateways"].values() for t in g.values()), status
    inputs, expected = simple_inputs()
    versions = set()
    for _ in range(50):
        result = grpc_client.infer("simple", inputs, client_timeout=10)
        assert np.array_equal(result.as_numpy("OUTPUT0"), expected)
        versions.add(result.get_response().model_version)
    assert versions == {"2"}  # still the last good split (0/100)


def test_a_weight_beyond_uint32_is_refused(mesh: MeshHandle, no_split: None) -> None:
    """Envoy's weights are UInt32Value: the API must refuse what it cannot translate, and keep
    the policy it had (a stored split that cannot be translated breaks every later snapshot)."""
    mesh.set_split("simple", {"1": 50, "2": 50})
    code, doc = mesh.api("PUT", "splits/simple", {"weights": {"1": 2**32, "2": 1}})
    status = mesh.status()
    assert status is not None
    assert (code, status["splits"].get("simple")) == (400, {"1": 50, "2": 50}), doc


def test_meshserve_command_against_the_running_mesh(
    mesh: MeshHandle, second_service: ServiceProcess, no_split: None
) -> None:
    """The CLI as a user runs it: status, models, split (and its refusal), clear."""
    import subprocess
    import sys

    def meshserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deploy.cli", "--url", f"http://{mesh.http_url}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    status = meshserve("status")
    assert status.returncode == 0, status.stderr
    assert "simple" in status.stdout and "READY" in status.stdout
    models = meshserve("models")
    assert models.returncode == 0 and "simple_string" in models.stdout
    done = meshserve("split", "simple", "1=70", "2=30")
    assert done.returncode == 0 and "1=70 2=30" in done.stdout, done.stderr
    status_text = meshserve("status").stdout
    assert "split simple: 1=70 2=30" in status_text
    assert "caller meshserve-caller/ensemble/" in status_text  # chain3's route watch
    refused = meshserve("split", "simple", "1=0", "2=0")
    assert refused.returncode != 0 and "add up to 0" in refused.stderr
    assert meshserve("split", "simple", "--clear").returncode == 0
    assert "split simple" not in meshserve("status").stdout
    answer = meshserve(
        "infer",
        "simple",
        "--version",
        "1",
        "--input",
        "INPUT0=[" + ",".join(str(i) for i in range(16)) + "]",
        "--input",
        "INPUT1=2",
    )
    assert answer.returncode == 0, answer.stderr
    assert "model simple version 1" in answer.stdout
    sums = "OUTPUT0 INT32 [1, 16]: [[" + ", ".join(str(i + 2) for i in range(16)) + "]]"
    assert sums in answer.stdout, answer.stdout
    wrong = meshserve("infer", "simple", "--input", "INPUT0=[1,2]")
    assert wrong.returncode != 0 and "2 value(s) given, shape [1, 16] needs 16" in wrong.stderr
