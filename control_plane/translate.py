"""Pure translation of the mesh state into the Envoy resources the gateway runs on.

Data flow: sources and the traffic policy store produce a ``MeshState``; ``translate`` turns it
into ``Resources`` (listeners, route configurations, clusters, cluster load assignments); the
snapshot checks them for consistency and the ADS server packs and pushes them. No I/O, no clock:
equal states give equal resources, each list sorted by name, so versions stay stable.

Placement: a model version gets a cluster ``model:<m>:<v>`` (gRPC, HTTP/2) and a twin
``model-http:<m>:<v>`` (REST, HTTP/1.1) as soon as one replica has it READY; their endpoints (EDS)
are exactly those replicas. A request naming no version goes to the model's default: the traffic
policy's weights over its READY versions, or, without a policy (or with none of its versions
READY), the highest READY version; the policy's mirror applies while its shadow version is READY
(control_plane/mirror.py). A stateful model's clusters hash (control_plane/sequence_affinity.py).
Everything else goes to the control plane's front
(``front`` / ``front-http``, static clusters). Listener and route details: filters.py, routes.py.
With ``tracing`` given, a static ``otel-collector`` cluster and Envoy's OpenTelemetry tracer on
both listeners are added (control_plane/tracing.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, health_check_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from control_plane.collector import collector_cluster
from control_plane.filters import grpc_listener, http_listener
from control_plane.gateway_tls import INTERNAL_GRPC_LISTENER, LOOPBACK, GatewayTls
from control_plane.mirror import active_mirror
from control_plane.model import Address, MeshState, ServiceInstance, cluster_name, http_cluster_name
from control_plane.routes import (
    FRONT_CLUSTER,
    FRONT_HTTP_CLUSTER,
    ModelRoutes,
    grpc_route_config,
    http_route_config,
)
from control_plane.tracing import GatewayTracing

_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True, slots=True)
class Resources:
    """One consistent set of xDS resources, each list sorted by resource name."""

    listeners: list[listener_pb2.Listener]
    routes: list[route_pb2.RouteConfiguration]
    clusters: list[cluster_pb2.Cluster]
    endpoints: list[endpoint_pb2.ClusterLoadAssignment]
    #: what the TLS listener names (the control plane adds them: control_plane/gateway_secrets.py)
    secrets: list[secret_pb2.Secret] = field(default_factory=list)


def translate(
    state: MeshState,
    *,
    grpc_port: int,
    http_port: int,
    host: str = "127.0.0.1",
    tracing: GatewayTracing | None = None,
    tls: GatewayTls | None = None,
    internal_grpc_port: int = 0,
) -> Resources:
    """The gateway's resources for ``state``; the listeners bind ``host`` at the two ports and
    trace to ``tracing``'s collector when it is given. With ``tls`` the gRPC listener serves
    TLS; ``internal_grpc_port`` (0: none) adds a plaintext gRPC listener with the same routes, on
    loopback only."""
    replicas = ready_replicas(state.instances)
    models = model_routes(state, replicas)
    has_front = (state.front_grpc is not None, state.front_http is not None)

    clusters: list[cluster_pb2.Cluster] = []
    endpoints: list[endpoint_pb2.ClusterLoadAssignment] = []
    for (model, version), instances in replicas.items():
        hashed = _stateful(instances, model, version)
        grpc_name = cluster_name(model, version)
        clusters.append(_model_cluster(grpc_name, http2=True, hashed=hashed))
        endpoints.append(
            _load_assignment(grpc_name, [(i.host, i.grpc_port, i.id) for i in instances])
        )
        rest = [(i.host, i.http_port, i.id) for i in instances if i.http_port > 0]
        if rest:
            http_name = http_cluster_name(model, version)
            clusters.append(_model_cluster(http_name, http2=False, hashed=hashed))
            endpoints.append(_load_assignment(http_name, rest))
    if state.front_grpc is not None:
        clusters.append(_static_cluster(FRONT_CLUSTER, state.front_grpc, http2=True))
    if state.front_http is not None:
        clusters.append(_static_cluster(FRONT_HTTP_CLUSTER, state.front_http, http2=False))
    if tracing is not None:
        clusters.append(collector_cluster(tracing.collector))

    # a model that has REST on no replica has no model-http clusters: its REST goes to the front
    rest_models = [
        m
        for m in models
        if all(http_cluster_name(m.name, v) in _names(clusters) for v in m.versions)
    ]
    listeners = [
        grpc_listener(host, grpc_port, tracing, tls),
        http_listener(host, http_port, tracing),
    ]
    if internal_grpc_port:
        listeners.append(
            grpc_listener(LOOPBACK, internal_grpc_port, tracing, name=INTERNAL_GRPC_LISTENER)
        )
    return Resources(
        listeners=listeners,
        routes=[
            grpc_route_config(models, has_front=has_front[0]),
            http_route_config(rest_models, has_front=has_front[1]),
        ],
        clusters=sorted(clusters, key=lambda c: str(c.name)),
        endpoints=sorted(endpoints, key=lambda e: str(e.cluster_name)),
    )


def ready_replicas(
    instances: Iterable[ServiceInstance],
) -> dict[tuple[str, str], list[ServiceInstance]]:
    """(model, version) → the instances that have it READY, sorted by instance id; keys sorted."""
    by_version: dict[tuple[str, str], list[ServiceInstance]] = defaultdict(list)
    for instance in sorted(instances, key=lambda i: i.id):
        for mv in instance.ready_versions():
            if instance not in by_version[(mv.name, mv.version)]:
                by_version[(mv.name, mv.version)].append(instance)
    return {key: by_version[key] for key in sorted(by_version, key=_model_version_key)}


def model_routes(
    state: MeshState, replicas: dict[tuple[str, str], list[ServiceInstance]]
) -> list[ModelRoutes]:
    """Per model with a READY version (sorted by name): its versions, default choice, mirror."""
    versions: dict[str, list[str]] = defaultdict(list)
    stateful: set[str] = set()
    for (model, version), instances in replicas.items():
        versions[model].append(version)
        if _stateful(instances, model, version):
            stateful.add(model)
    result = []
    for model in sorted(versions):
        ready = sorted(versions[model], key=version_key)
        result.append(
            ModelRoutes(
                name=model,
                versions=tuple(ready),
                default=_default(state, model, ready),
                mirror=active_mirror(state.policies.get(model), ready),
                stateful=model in stateful,
            )
        )
    return result


def _stateful(instances: list[ServiceInstance], model: str, version: str) -> bool:
    """Whether a replica reports ``model`` ``version`` as stateful (sequence-batched)."""
    key = (model, version)
    return any(mv.stateful for i in instances for mv in i.models if (mv.name, mv.version) == key)


def version_key(version: str) -> tuple[int, int, str]:
    """Order versions numerically ("10" after "9"); non-numeric ones first, by text."""
    return (1, int(version), "") if version.isdecimal() else (0, 0, version)


def _model_version_key(key: tuple[str, str]) -> tuple[str, tuple[int, int, str]]:
    return key[0], version_key(key[1])


def _default(state: MeshState, model: str, ready: list[str]) -> tuple[tuple[str, int], ...]:
    policy = state.policies.get(model)
    if policy is not None:
        weighted = tuple(
            (v, int(policy.weights[v])) for v in ready if int(policy.weights.get(v, 0)) > 0
        )
        if weighted:
            return weighted
    return ((ready[-1], 1),)


def _names(clusters: list[cluster_pb2.Cluster]) -> set[str]:
    return {str(c.name) for c in clusters}


def _seconds(value: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(value), nanos=round(value % 1 * 1e9))


def _protocol_options(http2: bool) -> dict[str, any_pb2.Any]:
    explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig()
    if http2:
        explicit.http2_protocol_options.CopyFrom(protocol_pb2.Http2ProtocolOptions())
    else:
        explicit.http_protocol_options.CopyFrom(protocol_pb2.Http1ProtocolOptions())
    packed = any_pb2.Any()
    packed.Pack(
        http_protocol_options_pb2.HttpProtocolOptions(explicit_http_config=explicit),
        deterministic=True,
    )
    return {_PROTOCOL_OPTIONS: packed}


def _model_cluster(name: str, *, http2: bool, hashed: bool = False) -> cluster_pb2.Cluster:
    """An EDS cluster of replicas serving one model version, health-checked and ejecting;
    ``hashed``: replicas picked by the route's hash (a stateful model's sequence), else by
    least requests."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=_seconds(1),
        lb_policy=cluster_pb2.Cluster.RING_HASH if hashed else cluster_pb2.Cluster.LEAST_REQUEST,
        typed_extension_protocol_options=_protocol_options(http2),
        # A replica that left the registry (it deregistered to stop) leaves the load balancer at
        # once; by default Envoy keeps a removed host until its health checks fail (~2 s)
        ignore_health_on_host_removal=True,
        # Eject a replica for connection-level failures only (refused, reset, timed out: it is
        # down). A model's own answers (e.g. UNAVAILABLE while it unloads, which gRPC maps to 503)
        # say nothing about the host and must not eject it from the cluster.
        outlier_detection=outlier_detection_pb2.OutlierDetection(
            split_external_local_origin_errors=True,
            consecutive_local_origin_failure=wrappers_pb2.UInt32Value(value=2),
            enforcing_consecutive_local_origin_failure=wrappers_pb2.UInt32Value(value=100),
            enforcing_consecutive_5xx=wrappers_pb2.UInt32Value(value=0),
            enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=0),
            enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
            interval=_seconds(1),
            base_ejection_time=_seconds(5),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=50),
        ),
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    retry_budget=circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
                        budget_percent=percent_pb2.Percent(value=25.0),
                        min_retry_concurrency=wrappers_pb2.UInt32Value(value=32),
                    )
                )
            ]
        ),
    )
    cluster.eds_cluster_config.eds_config.CopyFrom(
        config_source_pb2.ConfigSource(
            ads=config_source_pb2.AggregatedConfigSource(),
            resource_api_version=config_source_pb2.ApiVersion.V3,
        )
    )
    check = health_check_pb2.HealthCheck(
        timeout=_seconds(1),
        interval=_seconds(1),
        no_traffic_interval=_seconds(2),
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=2),
        healthy_threshold=wrappers_pb2.UInt32Value(value=1),
    )
    if http2:
        # gRPC health of the whole service (service name ""), the mesh's readiness signal
        check.grpc_health_check.service_name = ""
    else:
        # Envoy checks gRPC health only over HTTP/2: REST replicas answer the same readiness
        # here (services/core/http_app.py SERVING_PATH; not /v2/health/ready, which
        # --strict-readiness ties to every model's state)
        check.http_health_check.path = "/meshserve/v1/serving"
    cluster.health_checks.append(check)
    return cluster


def _static_cluster(name: str, address: Address, *, http2: bool) -> cluster_pb2.Cluster:
    """The control plane's front: one fixed address, no EDS."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_seconds(1),
        typed_extension_protocol_options=_protocol_options(http2),
        load_assignment=_load_assignment(name, [(address.host, address.port, "")]),
    )


def _load_assignment(
    cluster: str, hosts: list[tuple[str, int, str]]
) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints (host, port, instance id), in the given order. A hashing cluster places each
    endpoint on its ring by the instance id (``envoy.lb`` ``hash_key``), so a version's gRPC and
    REST clusters send one sequence to the same service."""
    lb_endpoints = []
    for host, port, instance in hosts:
        endpoint = endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=host, port_value=port)
                )
            )
        )
        if instance:
            endpoint.metadata.filter_metadata["envoy.lb"].update({"hash_key": instance})
        lb_endpoints.append(endpoint)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)],
    )
