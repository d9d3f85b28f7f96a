"""Route configurations of the gateway: which request goes to which model-version cluster.

Data flow: ``translate`` works out, per model, its READY versions and the default choice (the
highest READY version, or weights over READY versions from the traffic policy) as ``ModelRoutes``;
this module turns them into the two RDS resources that Envoy's listeners name:

``grpc_routes`` (gRPC listener), first match wins:
  1. header routes: ``meshserve-model`` (+ ``meshserve-version``) name the target; headers override
     the body, so these come first and switch the body filters off (compressed messages pass too);
  2. a request carrying ``meshserve-model`` that no header route took (unknown model or version)
     goes to the front, which answers NOT_FOUND naming it;
  3. compressed requests (``grpc-encoding`` other than ``identity``) with no header: the field
     extraction cannot read them, so it is switched off and the front takes them;
  4. dynamic-metadata routes on the fields that ``grpc_field_extraction`` read from the body
     (``model_name``/``model_version`` for ModelInfer and ModelStreamInfer, ``name``/``version``
     for ModelReady/Metadata/Config/Statistics), version-specific before version-less; they take
     effect because the Lua filter clears the route cache after the extraction ran;
  5. everything else (server-level RPCs, repository control, unknown models) goes to the front.
  Streams (ModelStreamInfer) are routed once, by their first message: every later message of the
  stream goes to the same cluster and host, whatever model it names (that service passes the
  requests for other services' models on: services/core/stream_forward.py).

``http_routes`` (REST listener): by path, ``/v2/models/<m>/versions/<v>/...`` to that version,
``/v2/models/<m>[/...]`` to the model's default, the rest (health, repository, shared memory,
``/v2/models/stats``, ``/v2/models/<m>/trace/setting``, unknown models) to the front.

A request that names no version and reaches a weighted default gets the chosen version as the
``meshserve-version`` request header, so the service serves exactly what the split picked.

The routes of a stateful model hash on the request's sequence (control_plane/sequence_affinity.py).

A model with an active mirror (control_plane/mirror.py) gets a request mirror policy on its
version-less inference routes: ``body:model_name:<m>``, and two extra routes placed just before
the version-less route they refine, ``hdr:<m>:infer`` (header-routed ModelInfer/ModelStreamInfer)
and ``path:<m>:infer`` (REST ``/v2/models/<m>/infer``); other calls are routed as without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from control_plane.mirror import INFER_GRPC_PATH, request_mirror_policy
from control_plane.model import Mirror, cluster_name, http_cluster_name
from control_plane.sequence_affinity import make_sticky

GRPC_ROUTES = "grpc_routes"
HTTP_ROUTES = "http_routes"
FRONT_CLUSTER = "front"
FRONT_HTTP_CLUSTER = "front-http"
MODEL_HEADER = "meshserve-model"
VERSION_HEADER = "meshserve-version"
EXTRACTION_FILTER = "envoy.filters.http.grpc_field_extraction"
LUA_FILTER = "envoy.filters.http.lua"
#: request bodies Envoy may buffer (field extraction, retries); the default 16 MiB is too small
BODY_BUFFER_LIMIT = 80 * 1024 * 1024
#: REST path of one model's trace settings (Envoy RE2)
MODEL_TRACE_SETTING = "^/v2/models/[^/]+/trace/setting$"
#: (name key, version key) in the extraction's dynamic metadata, per request family
METADATA_KEYS = (("model_name", "model_version"), ("name", "version"))

_GRPC_RETRY_ON = "unavailable,reset,connect-failure,refused-stream"
_HTTP_RETRY_ON = "reset,connect-failure,refused-stream,retriable-status-codes"
_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


@dataclass(frozen=True, slots=True)
class ModelRoutes:
    """What routing needs to know about one model."""

    name: str
    #: versions READY on at least one replica, in ascending version order
    versions: tuple[str, ...]
    #: (version, weight) for requests naming no version; one entry means no split
    default: tuple[tuple[str, int], ...]
    #: the traffic policy's mirror, only while its shadow version is READY (see mirror.py)
    mirror: Mirror | None = None
    #: a version is sequence-batched: each sequence stays on one version and replica
    #: (sequence_affinity.py)
    stateful: bool = False


def grpc_route_config(
    models: list[ModelRoutes], *, has_front: bool
) -> route_pb2.RouteConfiguration:
    """The ``grpc_routes`` RouteConfiguration (see the module docstring for the order)."""
    routes: list[rc.Route] = []
    for m in models:
        for v in m.versions:
            match = _grpc_match(
                _header_exact(MODEL_HEADER, m.name), _header_exact(VERSION_HEADER, v)
            )
            routes.append(_grpc_route(f"hdr:{m.name}:{v}", match, m, v))
        headers = [_header_exact(MODEL_HEADER, m.name), _header_absent(VERSION_HEADER)]
        if m.mirror is not None:
            infer = rc.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=INFER_GRPC_PATH))
            infer.headers.extend(headers)
            routes.append(_mirrored(_grpc_route(f"hdr:{m.name}:infer", infer, m, None), m))
        routes.append(_grpc_route(f"hdr:{m.name}", _grpc_match(*headers), m, None))
    for route in routes:
        _disable_body_filters(route)

    unrouted_header = _grpc_match(rc.HeaderMatcher(name=MODEL_HEADER, present_match=True))
    compressed = _grpc_match(
        rc.HeaderMatcher(name="grpc-encoding", present_match=True),
        rc.HeaderMatcher(
            name="grpc-encoding",
            string_match=string_pb2.StringMatcher(exact="identity"),
            invert_match=True,
        ),
    )
    for name, match in (("hdr:unknown", unrouted_header), ("compressed", compressed)):
        route = _front_grpc_route(name, match, has_front=has_front)
        _disable_body_filters(route)
        routes.append(route)

    for m in models:
        for name_key, version_key in METADATA_KEYS:
            for v in m.versions:
                match = _grpc_match()
                match.dynamic_metadata.extend(
                    [_metadata_is(name_key, m.name), _metadata_is(version_key, v)]
                )
                routes.append(_grpc_route(f"body:{name_key}:{m.name}:{v}", match, m, v))
            match = _grpc_match()
            match.dynamic_metadata.extend(
                [_metadata_is(name_key, m.name), _metadata_empty(version_key)]
            )
            route = _grpc_route(f"body:{name_key}:{m.name}", match, m, None)
            # only ModelInfer / ModelStreamInfer carry model_name (the rest: name)
            routes.append(_mirrored(route, m) if name_key == "model_name" else route)

    routes.append(_front_grpc_route("front", _grpc_match(), has_front=has_front))
    return _route_config(GRPC_ROUTES, routes)


def http_route_config(
    models: list[ModelRoutes], *, has_front: bool
) -> route_pb2.RouteConfiguration:
    """The ``http_routes`` RouteConfiguration: REST v2 routed by path."""
    routes = [
        _front_http_route("stats", rc.RouteMatch(path="/v2/models/stats"), has_front=has_front),
        # a model's trace settings are made on every service, as over gRPC
        _front_http_route("trace", _regex_match(MODEL_TRACE_SETTING), has_front=has_front),
    ]
    for m in models:
        model_path = "/v2/models/" + _path_pattern(m.name)
        for v in m.versions:
            match = _regex_match(f"^{model_path}/versions/{_path_pattern(v)}(/.*)?$")
            routes.append(_http_route(f"path:{m.name}:{v}", match, m, v))
        # a version that is not READY must not fall through to the model's default
        unknown = _regex_match(f"^{model_path}/versions/[^/]*(/.*)?$")
        routes.append(_front_http_route(f"path:{m.name}:unknown", unknown, has_front=has_front))
        if m.mirror is not None:
            infer = _http_route(
                f"path:{m.name}:infer", _regex_match(f"^{model_path}/infer$"), m, None
            )
            routes.append(_mirrored(infer, m, http=True))
        routes.append(_http_route(f"path:{m.name}", _regex_match(f"^{model_path}(/.*)?$"), m, None))
    routes.append(_front_http_route("front", rc.RouteMatch(prefix="/"), has_front=has_front))
    return _route_config(HTTP_ROUTES, routes)


def re2_escape(text: str) -> str:
    """``text`` as an RE2 literal (Python's ``re.escape`` escapes characters RE2 rejects)."""
    return "".join("\\" + c if c in _RE2_SPECIAL else c for c in text)


def _path_pattern(segment: str) -> str:
    """A path segment as clients send it: raw, or percent-encoded as tritonclient does."""
    forms = sorted({segment, quote(segment, safe="")})
    if len(forms) == 1:
        return re2_escape(forms[0])
    return "(?:" + "|".join(re2_escape(f) for f in forms) + ")"


def _route_config(name: str, routes: list[rc.Route]) -> route_pb2.RouteConfiguration:
    vhost = rc.VirtualHost(
        name=name,
        domains=["*"],
        routes=routes,
        request_body_buffer_limit=wrappers_pb2.UInt64Value(value=BODY_BUFFER_LIMIT),
    )
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[vhost])


def _grpc_match(*headers: rc.HeaderMatcher) -> rc.RouteMatch:
    return rc.RouteMatch(prefix="/", headers=list(headers))


def _regex_match(pattern: str) -> rc.RouteMatch:
    return rc.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def _header_exact(name: str, value: str) -> rc.HeaderMatcher:
    return rc.HeaderMatcher(name=name, string_match=string_pb2.StringMatcher(exact=value))


def _header_absent(name: str) -> rc.HeaderMatcher:
    return rc.HeaderMatcher(name=name, present_match=True, invert_match=True)


def _metadata_is(key: str, value: str) -> metadata_pb2.MetadataMatcher:
    """The extracted field ``key`` (a list of strings) holds ``value``."""
    one_of = value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=value))
    return metadata_pb2.MetadataMatcher(
        filter=EXTRACTION_FILTER,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=key)],
        value=value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=one_of)),
    )


def _metadata_empty(key: str) -> metadata_pb2.MetadataMatcher:
    """The extracted field ``key`` is absent or holds no non-empty string (no version asked)."""
    non_empty = value_pb2.ValueMatcher(
        string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".+"))
    )
    return metadata_pb2.MetadataMatcher(
        filter=EXTRACTION_FILTER,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=key)],
        value=value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=non_empty)),
        invert=True,
    )


def _disable_body_filters(route: rc.Route) -> None:
    """Skip field extraction and the route-cache clear on ``route`` (routed by its headers)."""
    for name in (EXTRACTION_FILTER, LUA_FILTER):
        route.typed_per_filter_config[name].Pack(rc.FilterConfig(disabled=True), deterministic=True)


def _version_header(version: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=VERSION_HEADER, value=version),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _target(route: rc.Route, model: ModelRoutes, version: str | None, *, http: bool) -> None:
    """Point ``route`` at one version, or at the model's default (weighted when split)."""
    cluster = http_cluster_name if http else cluster_name
    if version is None and len(model.default) == 1:
        version = model.default[0][0]
    if version is not None:
        route.route.cluster = cluster(model.name, version)
        route.request_headers_to_add.append(_version_header(version))
        return
    route.route.weighted_clusters.clusters.extend(
        rc.WeightedCluster.ClusterWeight(
            name=cluster(model.name, v),
            weight=wrappers_pb2.UInt32Value(value=w),
            request_headers_to_add=[_version_header(v)],
        )
        for v, w in model.default
    )


def _mirrored(route: rc.Route, model: ModelRoutes, *, http: bool = False) -> rc.Route:
    """``route`` with ``model``'s mirror (if any): the copy goes to the shadow's cluster and has
    its ``meshserve-version`` overwritten (it would carry the primary's otherwise)."""
    if model.mirror is not None:
        cluster = (http_cluster_name if http else cluster_name)(model.name, model.mirror.version)
        route.route.request_mirror_policies.append(
            request_mirror_policy(
                cluster, model.mirror.percent, [_version_header(model.mirror.version)]
            )
        )
    return route


def _retry_policy(retry_on: str) -> rc.RetryPolicy:
    policy = rc.RetryPolicy(
        retry_on=retry_on,
        num_retries=wrappers_pb2.UInt32Value(value=2),
        host_selection_retry_max_attempts=3,
    )
    policy.retry_host_predicate.add(
        name="envoy.retry_host_predicates.previous_hosts"
    ).typed_config.Pack(previous_hosts_pb2.PreviousHostsPredicate(), deterministic=True)
    return policy


def _grpc_route(
    name: str, match: rc.RouteMatch, model: ModelRoutes, version: str | None
) -> rc.Route:
    route = rc.Route(name=name, match=match)
    _target(route, model, version, http=False)
    _grpc_action_defaults(route.route)
    route.route.retry_policy.CopyFrom(_retry_policy(_GRPC_RETRY_ON))
    if model.stateful:
        make_sticky(route)
    return route


def _grpc_action_defaults(action: rc.RouteAction) -> None:
    # no route timeout (streams live long); the client's grpc-timeout header bounds each call
    action.timeout.CopyFrom(duration_pb2.Duration(seconds=0))
    action.max_stream_duration.grpc_timeout_header_max.CopyFrom(duration_pb2.Duration(seconds=0))


def _http_route(
    name: str, match: rc.RouteMatch, model: ModelRoutes, version: str | None
) -> rc.Route:
    route = rc.Route(name=name, match=match)
    _target(route, model, version, http=True)
    route.route.timeout.CopyFrom(duration_pb2.Duration(seconds=0))
    policy = _retry_policy(_HTTP_RETRY_ON)
    policy.retriable_status_codes.append(503)
    route.route.retry_policy.CopyFrom(policy)
    if model.stateful:
        make_sticky(route)
    return route


def _front_grpc_route(name: str, match: rc.RouteMatch, *, has_front: bool) -> rc.Route:
    if not has_front:
        return _grpc_not_found(name, match)
    route = rc.Route(name=name, match=match, route=rc.RouteAction(cluster=FRONT_CLUSTER))
    _grpc_action_defaults(route.route)
    return route


def _front_http_route(name: str, match: rc.RouteMatch, *, has_front: bool) -> rc.Route:
    if not has_front:
        body = base_pb2.DataSource(inline_string='{"error":"no model route for this request"}')
        return rc.Route(
            name=name, match=match, direct_response=rc.DirectResponseAction(status=404, body=body)
        )
    route = rc.Route(name=name, match=match, route=rc.RouteAction(cluster=FRONT_HTTP_CLUSTER))
    route.route.timeout.CopyFrom(duration_pb2.Duration(seconds=0))
    return route


def _grpc_not_found(name: str, match: rc.RouteMatch) -> rc.Route:
    """With no front configured, Envoy itself answers a trailers-only NOT_FOUND."""
    headers = [
        ("content-type", "application/grpc"),
        ("grpc-status", "5"),
        ("grpc-message", "no model route for this request"),
    ]
    return rc.Route(
        name=name,
        match=match,
        direct_response=rc.DirectResponseAction(status=200),
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, value=v),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for k, v in headers
        ],
    )
