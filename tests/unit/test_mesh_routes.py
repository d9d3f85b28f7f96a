"""services/core/mesh_routes.py evaluates the gateway's own ``grpc_routes`` (made here by the
control plane's real translator, control_plane/routes.py) the way Envoy does for header-routed
calls, and declines (None: the call goes through the gateway) whatever it cannot route exactly."""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec
from envoy.config.endpoint.v3 import endpoint_pb2

from control_plane.model import Mirror, cluster_name
from control_plane.routes import ModelRoutes, grpc_route_config
from services.core.mesh_routes import RouteTable, endpoints_of

INFER = "/inference.GRPCInferenceService/ModelInfer"
A = ("10.0.0.1:9001",)
B = ("10.0.0.2:9001", "10.0.0.3:9001")


def table(*models: ModelRoutes, endpoints: dict[str, tuple[str, ...]] | None = None) -> RouteTable:
    config = grpc_route_config(list(models), has_front=True)
    if endpoints is None:
        endpoints = {cluster_name(m.name, v): B for m in models for v in m.versions}
    return RouteTable(config, endpoints)


def hdr(model: str, version: str = "") -> dict[str, str]:
    out = {"meshserve-model": model}
    if version:
        out["meshserve-version"] = version
    return out


SIMPLE = ModelRoutes("simple", ("1", "2"), (("2", 1),))


def test_pinned_version_goes_to_its_cluster_with_the_gateways_retries() -> None:
    routed = table(SIMPLE).route(INFER, hdr("simple", "1"))
    assert routed is not None
    assert routed.cluster == "model:simple:1"
    assert routed.endpoints == B
    assert dict(routed.headers) == {"meshserve-version": "1"}
    assert routed.retries == 2  # control_plane/routes.py: num_retries 2 on unavailable


def test_versionless_call_goes_to_the_default_and_names_it() -> None:
    routed = table(SIMPLE).route(INFER, hdr("simple"))
    assert routed is not None
    assert (routed.cluster, dict(routed.headers)) == ("model:simple:2", {"meshserve-version": "2"})


def test_a_split_picks_by_weight_and_names_the_picked_version() -> None:
    split = ModelRoutes("simple", ("1", "2"), (("1", 20), ("2", 80)))
    routes = table(split)
    picks = {}
    for point in (0.0, 0.19, 0.21, 0.99):
        routed = routes.route(INFER, hdr("simple"), rand=lambda p=point: p)
        assert routed is not None
        picks[point] = (routed.cluster, dict(routed.headers)["meshserve-version"])
    assert picks == {
        0.0: ("model:simple:1", "1"),
        0.19: ("model:simple:1", "1"),
        0.21: ("model:simple:2", "2"),
        0.99: ("model:simple:2", "2"),
    }


def test_unknown_model_or_version_is_left_to_the_gateway() -> None:
    routes = table(SIMPLE)
    assert routes.route(INFER, hdr("nope")) is None  # the front answers NOT_FOUND
    assert routes.route(INFER, hdr("simple", "7")) is None


def test_a_call_without_routing_headers_is_left_to_the_gateway() -> None:
    # the next routes match on fields the gateway extracts from the body
    assert table(SIMPLE).route(INFER, {}) is None


def test_mirrored_routes_are_left_to_the_gateway_pinned_ones_are_not() -> None:
    mirrored = ModelRoutes("simple", ("1", "2"), (("2", 1),), Mirror("1", 10.0))
    routes = table(mirrored)
    assert routes.route(INFER, hdr("simple")) is None
    pinned = routes.route(INFER, hdr("simple", "2"))
    assert pinned is not None and pinned.cluster == "model:simple:2"


def test_a_cluster_without_endpoints_is_left_to_the_gateway() -> None:
    routes = table(SIMPLE, endpoints={"model:simple:1": A})
    assert routes.route(INFER, hdr("simple", "2")) is None
    routed = routes.route(INFER, hdr("simple", "1"))
    assert routed is not None and routed.endpoints == A


def test_clusters_lists_every_cluster_a_route_names() -> None:
    split = ModelRoutes("simple", ("1", "2"), (("1", 1), ("2", 1)))
    assert table(split, endpoints={}).clusters() == {"model:simple:1", "model:simple:2", "front"}


def _lb(host: str, port: int, health: int = 0) -> ec.LbEndpoint:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )
    return ec.LbEndpoint(endpoint=ec.Endpoint(address=address), health_status=health)


def test_endpoints_of_skips_unhealthy_and_brackets_ipv6() -> None:
    assignment = endpoint_pb2.ClusterLoadAssignment(
        cluster_name="model:simple:1",
        endpoints=[
            ec.LocalityLbEndpoints(
                lb_endpoints=[_lb("10.0.0.1", 1), _lb("::1", 2), _lb("10.0.0.9", 3, health=2)]
            )
        ],
    )
    assert endpoints_of(assignment) == ("10.0.0.1:1", "[::1]:2")
