"""The whole mesh through Envoy while things change: model control, a replica killed, the control
plane restarted. Each test starts its own mesh (a few seconds), since each one breaks something.

Timings asserted here are the documented ones: a registration lease is 3 s (heartbeat every 1 s),
Envoy health-checks every 1 s and ejects after 2 failures, and retries UNAVAILABLE/reset/
connect-failure on another host.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import MeshHandle, make_repository, running_mesh, running_service, wait_for
from tests.e2e.traffic import Load, simple_inputs
from tests.otlp_receiver import OtlpReceiver


def envoy_hosts(mesh: MeshHandle, cluster: str) -> set[str]:
    """``host:port`` of every endpoint Envoy has in ``cluster`` (its admin ``/clusters``)."""
    with urllib.request.urlopen(f"{mesh.admin_url}/clusters", timeout=5) as r:
        lines = r.read().decode().splitlines()
    parts = [line.split("::") for line in lines if line.startswith(f"{cluster}::")]
    return {p[1] for p in parts if len(p) == 4 and p[2] == "cx_active"}


def envoy_clusters(mesh: MeshHandle) -> set[str]:
    with urllib.request.urlopen(f"{mesh.admin_url}/clusters", timeout=5) as r:
        return {line.split("::")[0] for line in r.read().decode().splitlines() if "::" in line}


@pytest.fixture
def grpc_client_of() -> Iterator[list[grpcclient.InferenceServerClient]]:
    made: list[grpcclient.InferenceServerClient] = []
    try:
        yield made
    finally:
        for client in made:
            client.close()


def _infer_error(client: grpcclient.InferenceServerClient) -> InferenceServerException | None:
    inputs, _ = simple_inputs()
    try:
        client.infer("simple", inputs, client_timeout=10)
    except InferenceServerException as exc:
        return exc
    return None


def test_load_adds_the_route_and_unload_removes_it(example_repo: Path, tmp_path: Path) -> None:
    repo = make_repository(example_repo, tmp_path / "models", ["simple"])
    with running_mesh(repo, tmp_path, model_control_mode="explicit") as mesh:
        c = grpcclient.InferenceServerClient(mesh.grpc_url)
        h = httpclient.InferenceServerClient(mesh.http_url)
        try:
            before = _infer_error(c)
            assert before is not None and before.status() == "StatusCode.NOT_FOUND", before
            assert "model:simple:1" not in envoy_clusters(mesh)

            start = time.monotonic()
            c.load_model("simple")
            wait_for(lambda: "model:simple:1" in envoy_clusters(mesh), 15, "route of 'simple'")
            assert c.is_model_ready("simple")
            assert h.is_model_ready("simple")
            inputs, expected = simple_inputs()
            assert np.array_equal(c.infer("simple", inputs).as_numpy("OUTPUT0"), expected)
            assert time.monotonic() - start < 15

            c.unload_model("simple")
            wait_for(lambda: "model:simple:1" not in envoy_clusters(mesh), 15, "route removed")
            # the registry gets UNLOADING first, then the final state with its reason
            wait_for(
                lambda: any(
                    m["name"] == "simple" and m["state"] == "UNAVAILABLE"
                    for i in (mesh.status() or {"instances": []})["instances"]
                    for m in i["models"]
                ),
                15,
                "'simple' UNAVAILABLE in the registry",
            )
            # The route is gone; the request falls to the front, which answers NOT_FOUND with the
            # registry's state and reason (the service itself would say UNAVAILABLE, as Triton).
            after = _infer_error(c)
            assert after is not None and after.status() == "StatusCode.NOT_FOUND", after
            assert "'simple'" in after.message() and "unloaded" in after.message()
            assert not c.is_model_ready("simple")
            with pytest.raises(InferenceServerException) as info:
                h.get_model_metadata("simple")
            assert info.value.status() == "404", info.value
            assert "unloaded" in info.value.message()
        finally:
            c.close()
            h.close()


def test_a_replica_that_joins_later_gets_the_regions_registered_at_the_gateway(
    example_repo: Path, tmp_path: Path
) -> None:
    """Regions registered through the gateway (gRPC and REST) before a second replica joined are
    made on it before the gateway routes to it, so requests naming them succeed on either
    replica; unregistering at the gateway removes a region from both."""
    repo = make_repository(example_repo, tmp_path / "models", ["simple"])
    a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.full((1, 16), 2, dtype=np.int32)
    key = f"/meshserve_join_{os.getpid()}"
    handle = shm.create_shared_memory_region("joined", key, 128)
    try:
        shm.set_shared_memory_region(handle, [a, b])
        with running_mesh(repo, tmp_path) as mesh:
            c = grpcclient.InferenceServerClient(mesh.grpc_url)
            h = httpclient.InferenceServerClient(mesh.http_url)
            try:
                c.register_system_shared_memory("joined", key, 128)
                h.register_system_shared_memory("joined_rest", key, 64, offset=64)
                with running_service(repo, mesh, tmp_path, models=1) as replica:
                    doc = mesh.status()
                    assert doc is not None
                    address = next(i["address"] for i in doc["instances"] if i["id"] == replica.id)
                    with grpcclient.InferenceServerClient(address) as direct:
                        regions = direct.get_system_shared_memory_status(as_json=True).get(
                            "regions", {}
                        )
                        assert set(regions) == {"joined", "joined_rest"}, regions
                        assert regions["joined_rest"]["offset"] == "64"
                        wait_for(
                            lambda: len(envoy_hosts(mesh, "model:simple:1")) == 2, 5, "2 replicas"
                        )
                        ins = [
                            grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")
                        ]
                        ins[0].set_shared_memory("joined", 64)
                        ins[1].set_shared_memory("joined_rest", 64)
                        for _ in range(20):  # round robin over both replicas
                            out = c.infer("simple", ins).as_numpy("OUTPUT0")
                            assert np.array_equal(out, a + b)
                        c.unregister_system_shared_memory("joined")
                        left = direct.get_system_shared_memory_status(as_json=True).get(
                            "regions", {}
                        )
                        assert set(left) == {"joined_rest"}, left
            finally:
                c.close()
                h.close()
    finally:
        shm.destroy_shared_memory_region(handle)


def test_a_replica_that_joins_later_gets_the_settings_made_at_the_gateway(
    example_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Log settings (gRPC) and global (gRPC) and per-model (REST) trace settings changed through
    the gateway before a second replica joined are made on it before the gateway routes to it."""
    repo = make_repository(example_repo, tmp_path / "models", ["simple"])
    with OtlpReceiver() as receiver:
        # tracing on in every process, so TraceSetting can change it
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        with running_mesh(repo, tmp_path) as mesh:
            c = grpcclient.InferenceServerClient(mesh.grpc_url)
            h = httpclient.InferenceServerClient(mesh.http_url)
            try:
                c.update_log_settings({"log_verbose_level": 1, "log_warning": False})
                c.update_trace_settings(settings={"trace_rate": "4"})
                h.update_trace_settings(model_name="simple", settings={"trace_rate": "2"})
                with running_service(repo, mesh, tmp_path, models=1) as replica:
                    wait_for(lambda: len(envoy_hosts(mesh, "model:simple:1")) == 2, 5, "routed")
                    doc = mesh.status()
                    assert doc is not None
                    address = next(i["address"] for i in doc["instances"] if i["id"] == replica.id)
                    with grpcclient.InferenceServerClient(address) as direct:
                        logs = direct.get_log_settings(as_json=True)["settings"]
                        trace = direct.get_trace_settings(as_json=True)["settings"]
                        model = direct.get_trace_settings("simple", as_json=True)["settings"]
            finally:
                c.close()
                h.close()
    assert logs["log_verbose_level"] == {"uint32_param": 1}, logs
    assert logs["log_warning"] == {"bool_param": False}, logs
    assert trace["trace_rate"]["value"] == ["4"], trace
    assert model["trace_rate"]["value"] == ["2"], model


def test_sigkill_of_one_of_two_replicas_under_load(example_repo: Path, tmp_path: Path) -> None:
    repo = make_repository(example_repo, tmp_path / "models", ["simple"])
    with (
        running_mesh(repo, tmp_path) as mesh,
        running_service(repo, mesh, tmp_path, models=1) as replica,
    ):
        doc = mesh.status()
        assert doc is not None
        victim = next(i["address"] for i in doc["instances"] if i["id"] == replica.id)
        wait_for(lambda: len(envoy_hosts(mesh, "model:simple:1")) == 2, 5, "two replicas in EDS")

        with Load(mesh.grpc_url, threads=4) as load:
            time.sleep(1.5)
            assert load.snapshot().failed == []
            killed_at = time.monotonic()
            replica.kill()
            wait_for(lambda: replica.id not in mesh.instance_ids(), 6, "lease expiry")
            left_registry_s = time.monotonic() - killed_at
            wait_for(
                lambda: victim not in envoy_hosts(mesh, "model:simple:1"), 3, "endpoint out of EDS"
            )
            left_eds_s = time.monotonic() - killed_at
            time.sleep(max(0.0, killed_at + 7 - time.monotonic()))
        result = load.snapshot()

    print(f"lease expired {left_registry_s:.2f} s, out of EDS {left_eds_s:.2f} s after SIGKILL")
    print(
        f"{len(result.failed)} failed, {len(result.ok)} ok: {Counter(m for _, m in result.failed)}"
    )
    assert left_registry_s < 5.5, left_registry_s
    assert left_eds_s < 6, left_eds_s
    late = [f for f in result.failed if f[0] > killed_at + 4]
    assert late == [], late[:5]  # failures (if any) stopped within 4 s of the kill
    assert sum(t > killed_at + 4 for t, _ in result.ok) > 50


def test_control_plane_restart_keeps_traffic_and_resyncs(
    example_repo: Path, tmp_path: Path
) -> None:
    repo = make_repository(example_repo, tmp_path / "models", ["simple"], simple_versions=2)
    with running_mesh(repo, tmp_path) as mesh:
        mesh.set_split("simple", {"1": 100, "2": 0})
        with Load(mesh.grpc_url, threads=4) as load:
            time.sleep(0.5)
            killed_at = time.monotonic()
            mesh.kill_control_plane()
            time.sleep(2.0)
            restarted_at = time.monotonic()
            mesh.restart_control_plane()
            # the gateway reaches the new front only once it took the new control plane's config
            status = wait_for(mesh.status, 30, "status through the gateway after the restart")
            resynced_s = time.monotonic() - restarted_at
            assert status["splits"] == {"simple": {"1": 100, "2": 0}}  # the policy persisted
            wait_for(
                lambda: any(
                    m["name"] == "simple"
                    for i in (mesh.status() or {"instances": []})["instances"]
                    for m in i["models"]
                ),
                10,
                "the service registered again",
            )
            mesh.set_split("simple", {"1": 0, "2": 100})
            switched_at = time.monotonic()
            time.sleep(1.0)
        result = load.snapshot()

    outage = [v for t, v in result.ok if killed_at < t < restarted_at]
    assert outage and set(outage) == {"1"}  # Envoy kept serving on its last config
    failed_at = [t - killed_at for t, _ in result.failed]
    print(
        f"resynced {resynced_s:.2f} s after the restart; {len(result.ok)} ok, {len(outage)} "
        f"during the outage; failures: {Counter(m for _, m in result.failed)}"
    )
    assert failed_at == [], (
        f"{len(failed_at)} failures between {min(failed_at):.2f} s and {max(failed_at):.2f} s "
        f"after the kill (restart at {restarted_at - killed_at:.2f} s, resync took "
        f"{resynced_s:.2f} s): {Counter(m for _, m in result.failed)}"
    )
    assert {v for t, v in result.ok if t > switched_at + 0.2} == {"2"}  # the new split took effect
    assert resynced_s < 15, resynced_s


def test_sigterm_of_one_of_two_replicas_under_load_loses_nothing(
    example_repo: Path, tmp_path: Path
) -> None:
    """A replica stopped the way a rolling restart stops it (SIGTERM) leaves the mesh first and
    finishes what it has: not one request fails, before, during or after its stop."""
    repo = make_repository(example_repo, tmp_path / "models", ["simple"])
    with (
        running_mesh(repo, tmp_path) as mesh,
        running_service(repo, mesh, tmp_path, models=1) as replica,
    ):
        wait_for(lambda: len(envoy_hosts(mesh, "model:simple:1")) == 2, 5, "two replicas in EDS")
        with Load(mesh.grpc_url, threads=6) as load:
            time.sleep(1.5)
            stopped_at = time.monotonic()
            replica.stop()
            stop_s = time.monotonic() - stopped_at
            assert replica.proc is not None and replica.proc.returncode == 0, replica.log_tail()
            time.sleep(1.5)
        result = load.snapshot()

    print(f"replica stopped in {stop_s:.2f} s; {len(result.ok)} ok, {len(result.failed)} failed")
    assert result.failed == [], Counter(m for _, m in result.failed)
    assert sum(t > stopped_at + stop_s for t, _ in result.ok) > 50  # the other replica serves
