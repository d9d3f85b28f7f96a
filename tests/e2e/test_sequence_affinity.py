"""A stateful model on two replicas, with its versions split 50/50, through Envoy: every request
of a sequence reaches the replica and version that started it (control_plane/sequence_affinity.py),
over gRPC, REST, and both mixed within one sequence, while different sequences spread over both
replicas and both versions. Without the affinity the gateway balances request by request and a
sequence's later requests land where it is not running (refused) or on another version's state."""

from __future__ import annotations

import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.conftest import MeshHandle, make_repository, running_mesh, running_service, wait_for

MODEL = "simple_sequence"
STEPS = 6


def _two_version_repository(example_repo: Path, dst: Path) -> Path:
    repo = make_repository(example_repo, dst, [MODEL])
    shutil.copytree(repo / MODEL / "1", repo / MODEL / "2")
    config = repo / MODEL / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { all { } }\n")
    return repo


def _healthy_hosts(mesh: MeshHandle, cluster: str) -> int:
    """How many endpoints of ``cluster`` Envoy counts healthy (a replica that just joined is
    left off the hash ring until its first health check passes)."""
    with urllib.request.urlopen(f"{mesh.admin_url}/clusters", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(
        line.startswith(f"{cluster}::") and line.endswith("::health_flags::healthy")
        for line in lines
    )


def _values(sid: int) -> list[int]:
    return [(sid * 5 + k * 7) % 13 - 6 for k in range(STEPS)]


def _step(protocol: str, url: str, sid: int, value: int, first: bool, last: bool) -> int:
    module: Any = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(url)
    try:
        tensor = module.InferInput("INPUT", [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[value]], np.int32))
        result = client.infer(
            MODEL, [tensor], sequence_id=sid, sequence_start=first, sequence_end=last
        )
        return int(result.as_numpy("OUTPUT")[0, 0])
    finally:
        client.close()


def _sequence(mesh: MeshHandle, sid: int, protocols: list[str]) -> list[int]:
    """One sequence of STEPS requests, each a new connection, the k-th over ``protocols[k]``."""
    urls = {"grpc": mesh.grpc_url, "http": mesh.http_url}
    values = _values(sid)
    return [
        _step(protocols[k], urls[protocols[k]], sid, v, k == 0, k == STEPS - 1)
        for k, v in enumerate(values)
    ]


def _executions(address: str) -> dict[str, int]:
    """Version → inferences of the model on the service at ``address``."""
    with grpcclient.InferenceServerClient(address) as direct:
        stats = direct.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    return {s["version"]: int(s.get("inference_count", 0)) for s in stats}


def test_each_sequence_stays_on_one_replica_and_version(example_repo: Path, tmp_path: Path) -> None:
    repo = _two_version_repository(example_repo, tmp_path / "models")
    with (
        running_mesh(repo, tmp_path) as mesh,
        running_service(repo, mesh, tmp_path, models=2) as replica,
    ):
        for cluster in ("model", "model-http"):
            for v in ("1", "2"):
                name = f"{cluster}:{MODEL}:{v}"
                wait_for(lambda n=name: _healthy_hosts(mesh, n) == 2, 15, f"2 healthy in {name}")
        mesh.set_split(MODEL, {"1": 50, "2": 50})
        doc = mesh.status()
        assert doc is not None and replica.id in {i["id"] for i in doc["instances"]}
        addresses = [i["address"] for i in doc["instances"]]
        assert len(addresses) == 2, addresses
        # Envoy rebuilds the hash rings a moment after a host turns healthy: until one-request
        # sequences reach both replicas, new sequences may all hash to the first
        probe = iter(range(1000, 2000))

        def both_served() -> bool:
            sid = next(probe)
            _step("grpc", mesh.grpc_url, sid, 1, True, True)
            return all(sum(_executions(a).values()) > 0 for a in addresses)

        wait_for(both_served, 20, "one-request sequences on both replicas", every_s=0.05)
        before = [_executions(a) for a in addresses]

        mixed = ["grpc", "http", "http", "grpc", "http", "grpc"]
        plans = [(sid, ["grpc"] * STEPS) for sid in range(1, 13)]
        plans += [(sid, ["http"] * STEPS) for sid in range(13, 17)]
        plans += [(sid, mixed) for sid in range(17, 21)]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda plan: _sequence(mesh, *plan), plans))
        expected = [[int(x) for x in np.cumsum(_values(sid))] for sid, _ in plans]
        assert got == expected

        counts = [
            {v: n - old.get(v, 0) for v, n in _executions(a).items()}
            for a, old in zip(addresses, before, strict=True)
        ]
        # 20 sequences spread over both replicas and both versions (a fixed hash of IDs 1-20:
        # not a coin toss), and every request was served somewhere exactly once
        assert all(sum(c.values()) > 0 for c in counts), counts
        assert all(sum(c.get(v, 0) for c in counts) > 0 for v in ("1", "2")), counts
        assert sum(sum(c.values()) for c in counts) == len(plans) * STEPS, counts
