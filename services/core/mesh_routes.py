"""The gateway's gRPC routes, evaluated by a caller inside the mesh (pure: no I/O, no clock).

A service that calls another model (an ensemble step) can skip the gateway hop and still be
routed exactly as the gateway would route it: it reads the very ``RouteConfiguration`` the
control plane gives Envoy (``grpc_routes``, control_plane/routes.py) and the endpoints of the
clusters it names (EDS), over the same ADS (services/core/route_watch.py), and evaluates here the
part of it that header-routed calls reach:

- routes are tried in order; a route matches on its path (``prefix``, ``path`` or ``safe_regex``)
  and every header matcher (``string_match.exact``, ``present_match``, ``invert_match``);
- the first matching route decides: one cluster, or weighted clusters picked by weight; the
  route's and the chosen cluster's ``request_headers_to_add`` are the headers the call carries
  (``meshserve-version``: the version a split picked), and its retry policy's ``num_retries``
  bounds the retries of an UNAVAILABLE answer on another host.

Whatever this module does not evaluate exactly as Envoy does makes ``route`` answer None, and the
caller sends that call through the gateway instead: a route matching on dynamic metadata (body
fields), a matcher or action kind not listed above, a route with request mirroring (the copy is
the gateway's job), a route that hashes (a stateful model's: the gateway keeps each sequence on
its replica), a direct response, a cluster without known endpoints (the control plane's
front, answering NOT_FOUND for unknown models, is such a cluster).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2

#: what ``retry_on`` must name for an UNAVAILABLE answer to be retried (Envoy's gRPC retry-on)
_RETRIABLE = ("unavailable", "connect-failure", "reset", "refused-stream")


@dataclass(frozen=True, slots=True)
class Routed:
    """Where one call goes: a cluster's endpoints (``host:port``), the headers the route adds,
    and how many times an UNAVAILABLE answer may be retried on another endpoint."""

    cluster: str
    endpoints: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    retries: int


class _Unsupported(Exception):
    """A route element this module does not evaluate: the call goes through the gateway."""


class RouteTable:
    """One ``RouteConfiguration`` and the endpoints of its clusters, ready to route calls."""

    def __init__(
        self,
        config: route_pb2.RouteConfiguration,
        endpoints: Mapping[str, Sequence[str]],
    ) -> None:
        self.name = config.name
        self._routes = [r for vhost in config.virtual_hosts for r in vhost.routes]
        self._endpoints = {k: tuple(v) for k, v in endpoints.items()}
        self._regex: dict[str, re.Pattern[str] | None] = {}
        #: the headers any route matches on: a call's values of them decide its route
        self._keys = sorted({m.name.lower() for r in self._routes for m in r.match.headers})
        #: (path, those header values) → the first matching route (None: the gateway's)
        self._matched: dict[tuple[str, tuple[str | None, ...]], rc.Route | None] = {}

    def clusters(self) -> set[str]:
        """Every cluster a route of the table names (whose endpoints the caller must know)."""
        names = set()
        for route in self._routes:
            if route.HasField("route"):
                action = route.route
                if action.cluster:
                    names.add(action.cluster)
                names.update(c.name for c in action.weighted_clusters.clusters)
        return names

    def route(
        self,
        path: str,
        headers: Mapping[str, str],
        rand: Callable[[], float] = random.random,
    ) -> Routed | None:
        """Where a call of ``path`` with ``headers`` (lower-case keys) goes; None: ask the
        gateway (see the module docstring)."""
        key = (path, tuple(headers.get(k) for k in self._keys))
        if key not in self._matched:
            self._matched[key] = self._first_match(path, headers)
        route = self._matched[key]
        if route is None:
            return None
        try:
            return self._target(route, rand)
        except _Unsupported:
            return None

    def _first_match(self, path: str, headers: Mapping[str, str]) -> rc.Route | None:
        """The route Envoy would pick (None: none, or one this module cannot evaluate)."""
        try:
            for route in self._routes:
                if self._matches(route.match, path, headers):
                    return route
        except _Unsupported:
            return None
        return None

    # -- matching ---------------------------------------------------------------------------
    def _matches(self, match: rc.RouteMatch, path: str, headers: Mapping[str, str]) -> bool:
        if match.dynamic_metadata or match.query_parameters or match.HasField("grpc"):
            raise _Unsupported
        kind = match.WhichOneof("path_specifier")
        if kind == "prefix":
            if not path.startswith(match.prefix):
                return False
        elif kind == "path":
            if path != match.path:
                return False
        elif kind == "safe_regex":
            if self._compiled(match.safe_regex.regex).fullmatch(path) is None:
                return False
        else:
            raise _Unsupported
        return all(_header_matches(m, headers) for m in match.headers)

    def _compiled(self, pattern: str) -> re.Pattern[str]:
        if pattern not in self._regex:
            try:
                self._regex[pattern] = re.compile(pattern)
            except re.error:
                self._regex[pattern] = None
        compiled = self._regex[pattern]
        if compiled is None:
            raise _Unsupported
        return compiled

    # -- the action -------------------------------------------------------------------------
    def _target(self, route: rc.Route, rand: Callable[[], float]) -> Routed | None:
        if not route.HasField("route"):
            return None  # a direct response (or redirect): the gateway gives it
        action = route.route
        if action.request_mirror_policies or action.hash_policy:
            return None
        headers = _added(route.request_headers_to_add)
        kind = action.WhichOneof("cluster_specifier")
        if kind == "cluster":
            cluster = action.cluster
        elif kind == "weighted_clusters":
            chosen = _pick_weighted(action.weighted_clusters.clusters, rand)
            if chosen is None:
                return None
            cluster = chosen.name
            headers.update(_added(chosen.request_headers_to_add))
        else:
            raise _Unsupported
        endpoints = self._endpoints.get(cluster, ())
        if not endpoints:
            return None
        return Routed(cluster, endpoints, tuple(headers.items()), _retries(action))


def _header_matches(matcher: rc.HeaderMatcher, headers: Mapping[str, str]) -> bool:
    value = headers.get(matcher.name.lower())
    kind = matcher.WhichOneof("header_match_specifier")
    if kind == "present_match":
        result = (value is not None) == matcher.present_match
    elif kind == "string_match":
        string = matcher.string_match
        if string.WhichOneof("match_pattern") != "exact" or string.ignore_case:
            raise _Unsupported
        result = value == string.exact
    else:
        raise _Unsupported
    return bool(result != matcher.invert_match)


def _added(options: Sequence[base_pb2.HeaderValueOption]) -> dict[str, str]:
    """Headers a route adds (the value replaces what the call carried under that key)."""
    return {o.header.key.lower(): o.header.value for o in options}


def _pick_weighted(
    clusters: Sequence[rc.WeightedCluster.ClusterWeight], rand: Callable[[], float]
) -> rc.WeightedCluster.ClusterWeight | None:
    total = sum(c.weight.value for c in clusters)
    if total <= 0:
        return None
    point = rand() * total
    for c in clusters:
        point -= c.weight.value
        if point < 0:
            return c
    return clusters[-1]


def _retries(action: rc.RouteAction) -> int:
    policy = action.retry_policy
    if not any(cause.strip() in _RETRIABLE for cause in policy.retry_on.split(",")):
        return 0
    return policy.num_retries.value if policy.HasField("num_retries") else 1


def endpoints_of(assignment: endpoint_pb2.ClusterLoadAssignment) -> tuple[str, ...]:
    """The ``host:port`` of every endpoint of a ClusterLoadAssignment not marked unhealthy."""
    out = []
    for locality in assignment.endpoints:
        for lb in locality.lb_endpoints:
            if lb.health_status in _NOT_SERVING:
                continue
            address = lb.endpoint.address.socket_address
            host = f"[{address.address}]" if ":" in address.address else address.address
            out.append(f"{host}:{address.port_value}")
    return tuple(out)


# core.v3.HealthStatus: UNHEALTHY 2, DRAINING 3, TIMEOUT 4
_NOT_SERVING = frozenset({2, 3, 4})
