"""What the gateway itself counted: Envoy's admin stats, read by the e2e tests."""

from __future__ import annotations

import urllib.request

from tests.e2e.conftest import MeshHandle


def gateway_requests_to(mesh: MeshHandle, model: str) -> int:
    """Requests Envoy sent to the clusters of ``model``'s versions (upstream_rq_total)."""
    url = f"{mesh.admin_url}/stats?filter=upstream_rq_total"
    with urllib.request.urlopen(url, timeout=5) as r:
        lines = r.read().decode().splitlines()
    prefix = f"cluster.model_{model}_"
    return sum(int(line.split(":")[1]) for line in lines if prefix in line)
