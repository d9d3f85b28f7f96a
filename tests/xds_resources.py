"""Hand-built xDS resources for the snapshot, ADS and real-Envoy tests.

One gRPC listener ─▶ RDS route configuration ─▶ EDS clusters ─▶ endpoints, written directly with
xds-protos messages so these tests do not depend on ``control_plane.translate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

ROUTE_NAME = "grpc"


@dataclass
class Resources:
    """The shape ``make_snapshot`` reads (as ``translate.Resources``)."""

    listeners: list[Any] = field(default_factory=list)
    routes: list[Any] = field(default_factory=list)
    clusters: list[Any] = field(default_factory=list)
    endpoints: list[Any] = field(default_factory=list)
    secrets: list[Any] = field(default_factory=list)


def _any(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def _ads() -> Any:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _socket(host: str, port: int) -> Any:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def listener(port: int, route_name: str = ROUTE_NAME, name: str = "grpc") -> Any:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_name),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=_socket("127.0.0.1", port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(hcm),
                    )
                ]
            )
        ],
    )


def route_action(cluster: str = "", weights: dict[str, int] | None = None) -> Any:
    if weights is None:
        return route_components_pb2.RouteAction(cluster=cluster)
    return route_components_pb2.RouteAction(
        weighted_clusters=route_components_pb2.WeightedCluster(
            clusters=[
                route_components_pb2.WeightedCluster.ClusterWeight(
                    name=name, weight=wrappers_pb2.UInt32Value(value=weight)
                )
                for name, weight in weights.items()
            ]
        )
    )


def route_config(action: Any, name: str = ROUTE_NAME) -> Any:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"), route=action
                    )
                ],
            )
        ],
    )


def cluster(name: str) -> Any:
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=duration_pb2.Duration(seconds=1),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(http2)
        },
    )


def endpoints(cluster_name: str, *addresses: tuple[str, int]) -> Any:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=_socket(host, port))
                    )
                    for host, port in addresses
                ]
            )
        ],
    )


def mesh(
    listener_port: int,
    upstream: tuple[str, int],
    clusters: tuple[str, ...] = ("model:simple:1",),
    weights: dict[str, int] | None = None,
) -> Resources:
    """Listener → route (to ``clusters[0]``, or weighted) → EDS clusters → ``upstream``."""
    return Resources(
        listeners=[listener(listener_port)],
        routes=[route_config(route_action(clusters[0], weights))],
        clusters=[cluster(name) for name in clusters],
        endpoints=[endpoints(name, upstream) for name in clusters],
    )
