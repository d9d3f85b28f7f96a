"""Versioned, consistency-checked xDS snapshots and the cache the ADS streams read them from.

Data flow: ``translate`` turns mesh state into lists of Envoy resources; ``make_snapshot`` packs
them deterministically and names the set by a content hash (equal resources give equal versions,
across restarts too); ``SnapshotCache.set`` refuses a snapshot whose references dangle (an EDS
cluster without endpoints, an RDS name without a route configuration, a route to a missing
cluster, a TLS listener naming a secret the snapshot lacks) and wakes every ADS stream waiting
in ``wait_newer``. Streams only read from the cache.

Thread safety: the cache belongs to one asyncio event loop; call ``set`` and ``wait_newer`` from
that loop only.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

TYPE_PREFIX = "type.googleapis.com/"
LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = TYPE_PREFIX + secret_pb2.Secret.DESCRIPTOR.full_name
HCM = TYPE_PREFIX + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_DOWNSTREAM_TLS = TYPE_PREFIX + tls_pb2.DownstreamTlsContext.DESCRIPTOR.full_name

# Envoy's make-before-break order: clusters, their endpoints, the listeners' secrets, then
# listeners, their routes.
PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)
# Types whose responses always carry every resource (a resource left out is removed by Envoy).
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})


class InconsistentSnapshot(ValueError):
    """A snapshot whose resources reference something it does not contain; nothing is pushed."""


class ResourceLists(Protocol):
    """What ``make_snapshot`` reads: ``translate.Resources`` or any object with these lists."""

    @property
    def listeners(self) -> Sequence[Message]: ...
    @property
    def routes(self) -> Sequence[Message]: ...
    @property
    def clusters(self) -> Sequence[Message]: ...
    @property
    def endpoints(self) -> Sequence[Message]: ...
    @property
    def secrets(self) -> Sequence[Message]: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent set of resources: ``resources[type_url][name]`` and their packed forms."""

    version: str
    resources: Mapping[str, Mapping[str, Message]]
    packed: Mapping[str, Mapping[str, any_pb2.Any]]

    def names(self, type_url: str) -> frozenset[str]:
        return frozenset(self.resources.get(type_url, {}))

    def packed_for(self, type_url: str, names: Iterable[str] = ()) -> list[any_pb2.Any]:
        """The packed resources of a type, sorted by name; only ``names`` when any are given.

        Names the snapshot does not hold are left out (Envoy then keeps waiting for them).
        """
        of_type = self.packed.get(type_url, {})
        wanted = sorted(set(names)) if names else sorted(of_type)
        return [of_type[n] for n in wanted if n in of_type]


def _name_of(type_url: str, message: Message) -> str:
    name = str(getattr(message, "cluster_name" if type_url == ENDPOINT else "name"))
    if not name:
        raise InconsistentSnapshot(f"a {type_url.rsplit('.', 1)[-1]} resource has no name")
    return name


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def make_snapshot(resources: ResourceLists) -> Snapshot:
    """Pack every resource deterministically; the version is a hash of the packed content."""
    by_type: dict[str, Sequence[Message]] = {
        LISTENER: resources.listeners,
        ROUTE: resources.routes,
        CLUSTER: resources.clusters,
        ENDPOINT: resources.endpoints,
        SECRET: resources.secrets,
    }
    plain: dict[str, Mapping[str, Message]] = {}
    packed: dict[str, Mapping[str, any_pb2.Any]] = {}
    digest = hashlib.sha256()
    for type_url in PUSH_ORDER:
        named: dict[str, Message] = {}
        for message in by_type[type_url]:
            if message.DESCRIPTOR.full_name != type_url.removeprefix(TYPE_PREFIX):
                raise InconsistentSnapshot(
                    f"a {message.DESCRIPTOR.full_name} was given where {type_url} belongs"
                )
            name = _name_of(type_url, message)
            if name in named:
                raise InconsistentSnapshot(f"two {type_url.rsplit('.', 1)[-1]}s named '{name}'")
            named[name] = message
        packed_of_type = {name: _pack(m) for name, m in sorted(named.items())}
        for name, any_msg in packed_of_type.items():
            for part in (type_url, name):
                digest.update(part.encode() + b"\0")
            digest.update(len(any_msg.value).to_bytes(8, "big") + any_msg.value)
        plain[type_url] = MappingProxyType(named)
        packed[type_url] = MappingProxyType(packed_of_type)
    return Snapshot(
        version=digest.hexdigest()[:16],
        resources=MappingProxyType(plain),
        packed=MappingProxyType(packed),
    )


def _route_config_names(listener: Any) -> Iterable[tuple[str, Any]]:
    """(RDS name or "", inline RouteConfiguration or None) of each HTTP connection manager."""
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.type_url != HCM:
                continue
            hcm = hcm_pb2.HttpConnectionManager()
            network_filter.typed_config.Unpack(hcm)
            if hcm.HasField("rds"):
                yield hcm.rds.route_config_name, None
            elif hcm.HasField("route_config"):
                yield "", hcm.route_config


def _tracer_clusters(listener: Any) -> Iterable[str]:
    """The clusters the OpenTelemetry tracers of a listener's connection managers export to."""
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.type_url != HCM:
                continue
            hcm = hcm_pb2.HttpConnectionManager()
            network_filter.typed_config.Unpack(hcm)
            config = opentelemetry_pb2.OpenTelemetryConfig()
            if hcm.tracing.provider.typed_config.Unpack(config):
                yield config.grpc_service.envoy_grpc.cluster_name


def _listener_secrets(listener: Any) -> Iterable[str]:
    """The SDS secrets a listener's TLS contexts name."""
    for chain in listener.filter_chains:
        if chain.transport_socket.typed_config.type_url != _DOWNSTREAM_TLS:
            continue
        context = tls_pb2.DownstreamTlsContext()
        chain.transport_socket.typed_config.Unpack(context)
        common = context.common_tls_context
        yield from (config.name for config in common.tls_certificate_sds_secret_configs)
        if common.HasField("validation_context_sds_secret_config"):
            yield common.validation_context_sds_secret_config.name


def _route_clusters(route_config: Any) -> Iterable[tuple[str, str]]:
    """(route description, cluster name) for every cluster a route configuration names."""
    for vhost in route_config.virtual_hosts:
        for index, route in enumerate(vhost.routes):
            where = f"route config '{route_config.name}' virtual host '{vhost.name}' route " + (
                f"'{route.name}'" if route.name else f"#{index}"
            )
            if not route.HasField("route"):
                continue
            action = route.route
            if action.cluster:
                yield where, action.cluster
            for weighted in action.weighted_clusters.clusters:
                yield where, weighted.name
            for mirror in action.request_mirror_policies:
                if mirror.cluster:
                    yield where + " (mirror)", mirror.cluster


def check_consistency(snapshot: Snapshot) -> None:
    """Raise ``InconsistentSnapshot`` naming every dangling reference in ``snapshot``."""
    problems: list[str] = []
    clusters = snapshot.resources.get(CLUSTER, {})
    endpoints = snapshot.resources.get(ENDPOINT, {})
    routes = snapshot.resources.get(ROUTE, {})
    secrets = snapshot.resources.get(SECRET, {})
    for name, cluster in clusters.items():
        c: Any = cluster
        if c.WhichOneof("cluster_discovery_type") == "type" and c.type == cluster_pb2.Cluster.EDS:
            service = c.eds_cluster_config.service_name or name
            if service not in endpoints:
                problems.append(f"EDS cluster '{name}' has no ClusterLoadAssignment '{service}'")
    inline_configs: list[Any] = []
    for name, listener in snapshot.resources.get(LISTENER, {}).items():
        for secret in _listener_secrets(listener):
            if secret not in secrets:
                problems.append(f"listener '{name}' names secret '{secret}', which does not exist")
        for tracer_cluster in _tracer_clusters(listener):
            if tracer_cluster and tracer_cluster not in clusters:
                problems.append(
                    f"listener '{name}' traces to cluster '{tracer_cluster}', which does not exist"
                )
        for rds_name, inline in _route_config_names(listener):
            if inline is not None:
                inline_configs.append(inline)
            elif rds_name not in routes:
                problems.append(
                    f"listener '{name}' asks for RouteConfiguration '{rds_name}', "
                    "which the snapshot does not hold"
                )
    for route_config in [*routes.values(), *inline_configs]:
        for where, cluster_name in _route_clusters(route_config):
            if cluster_name not in clusters:
                problems.append(f"{where} points to cluster '{cluster_name}', which does not exist")
    if problems:
        raise InconsistentSnapshot(
            f"snapshot {snapshot.version} is inconsistent: " + "; ".join(problems)
        )


class SnapshotCache:
    """The current snapshot, and a way for streams to wait until a different one is set."""

    def __init__(self) -> None:
        self._current: Snapshot | None = None
        self._changed = asyncio.Event()

    @property
    def current(self) -> Snapshot | None:
        return self._current

    def set(self, snapshot: Snapshot) -> bool:
        """Publish ``snapshot`` once it passes ``check_consistency`` (which raises otherwise).

        Returns False, waking nobody, when its version is the one already published.
        """
        check_consistency(snapshot)
        if self._current is not None and self._current.version == snapshot.version:
            return False
        self._current = snapshot
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def wait_newer(self, version: str | None) -> Snapshot:
        """Return the current snapshot as soon as there is one whose version is not ``version``."""
        while self._current is None or self._current.version == version:
            await self._changed.wait()
        return self._current
