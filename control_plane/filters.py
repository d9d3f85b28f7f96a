"""The gateway's listeners: where clients connect and which HTTP filters their requests pass.

Data flow: ``translate`` calls these builders for the two listeners Envoy gets over LDS. Each
runs an HTTP connection manager whose routes arrive over RDS (``control_plane.routes``).
The gRPC listener's filter chain is what routes a request by its body:

  ``grpc_field_extraction`` reads fields 1 and 2 (model name, version) of the first message of
  each model-scoped request into dynamic metadata (descriptors from ``gateway.descriptors``)
  → ``lua`` clears the route cache so routes matching that metadata are chosen
  → ``meshserve.sequence`` (a script on stateful models' routes only) puts the request's
    sequence in the header those routes hash on (sequence_affinity.py)
  → ``grpc_stats`` (after the clear, so it counts under the model's cluster) → ``router``.

Header routes and compressed requests switch the first two off per route (see routes.py). The
REST listener runs ``meshserve.sequence`` (its JSON form) → ``router``.
With ``GatewayTls`` given, the gRPC listener serves TLS (and a plaintext twin may serve the
mesh's own callers, see gateway_tls.py). With ``GatewayTracing`` given, both connection managers
trace with Envoy's OpenTelemetry tracer (``control_plane.tracing``).
"""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.grpc_field_extraction.v3 import config_pb2 as extraction_pb2
from envoy.extensions.filters.http.grpc_stats.v3 import config_pb2 as grpc_stats_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from control_plane.gateway_tls import GatewayTls, downstream_tls
from control_plane.routes import EXTRACTION_FILTER, GRPC_ROUTES, HTTP_ROUTES, LUA_FILTER
from control_plane.sequence_affinity import (
    GRPC_SOURCE,
    HTTP_SOURCE,
    SEQUENCE_FILTER,
    sequence_filter,
)
from control_plane.tracing import GatewayTracing, hcm_tracing
from gateway.descriptors import descriptor_set_bytes

GRPC_LISTENER = "grpc"
HTTP_LISTENER = "http"
SERVICE = "inference.GRPCInferenceService"
#: methods whose request names its model in fields 1/2, and those fields' names
EXTRACTED_FIELDS: dict[str, tuple[str, str]] = {
    "ModelInfer": ("model_name", "model_version"),
    "ModelStreamInfer": ("model_name", "model_version"),
    "ModelReady": ("name", "version"),
    "ModelMetadata": ("name", "version"),
    "ModelConfig": ("name", "version"),
    "ModelStatistics": ("name", "version"),
}
#: a bidi stream (ModelStreamInfer) may sit idle between requests for this long
STREAM_IDLE_TIMEOUT_S = 3600

_LUA_CLEAR_ROUTE = """\
function envoy_on_request(request_handle)
  -- grpc_field_extraction has put the model name/version into dynamic metadata:
  -- choose the route again so the routes matching on it take effect.
  request_handle:clearRouteCache()
end
"""


def grpc_listener(
    host: str,
    port: int,
    tracing: GatewayTracing | None = None,
    tls: GatewayTls | None = None,
    name: str = GRPC_LISTENER,
) -> listener_pb2.Listener:
    """Listener ``grpc``: gRPC clients, routed by header or by request body; over TLS with
    ``tls`` (control_plane/gateway_tls.py)."""
    filters = [
        _http_filter(EXTRACTION_FILTER, _extraction_config()),
        _http_filter(
            LUA_FILTER,
            lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=_LUA_CLEAR_ROUTE)),
        ),
        _http_filter(SEQUENCE_FILTER, sequence_filter(GRPC_SOURCE)),
        _http_filter(
            "envoy.filters.http.grpc_stats",
            grpc_stats_pb2.FilterConfig(
                stats_for_all_methods=wrappers_pb2.BoolValue(value=True), enable_upstream_stats=True
            ),
        ),
        _http_filter("envoy.filters.http.router", router_pb2.Router()),
    ]
    hcm = _connection_manager(GRPC_LISTENER, GRPC_ROUTES, filters, tracing)
    hcm.stream_idle_timeout.CopyFrom(duration_pb2.Duration(seconds=STREAM_IDLE_TIMEOUT_S))
    listener = _listener(name, host, port, hcm)
    if tls is not None:
        listener.filter_chains[0].transport_socket.CopyFrom(downstream_tls(tls))
    return listener


def http_listener(
    host: str, port: int, tracing: GatewayTracing | None = None
) -> listener_pb2.Listener:
    """Listener ``http``: KServe v2 REST, routed by path."""
    filters = [
        _http_filter(SEQUENCE_FILTER, sequence_filter(HTTP_SOURCE)),
        _http_filter("envoy.filters.http.router", router_pb2.Router()),
    ]
    return _listener(
        HTTP_LISTENER,
        host,
        port,
        _connection_manager(HTTP_LISTENER, HTTP_ROUTES, filters, tracing),
    )


def _extraction_config() -> extraction_pb2.GrpcFieldExtractionConfig:
    config = extraction_pb2.GrpcFieldExtractionConfig(
        descriptor_set=base_pb2.DataSource(inline_bytes=descriptor_set_bytes())
    )
    for method, fields in EXTRACTED_FIELDS.items():
        extractions = config.extractions_by_method[f"{SERVICE}.{method}"]
        for field in fields:
            extractions.request_field_extractions[field].dynamic_metadata = EXTRACTION_FILTER
    return config


def _connection_manager(
    stat_prefix: str,
    route_config: str,
    filters: list[hcm_pb2.HttpFilter],
    tracing: GatewayTracing | None = None,
) -> hcm_pb2.HttpConnectionManager:
    ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads, route_config_name=route_config),
        http_filters=filters,
    )
    if tracing is not None:
        hcm.tracing.CopyFrom(hcm_tracing(tracing))
    return hcm


def _listener(
    name: str, host: str, port: int, hcm: hcm_pb2.HttpConnectionManager
) -> listener_pb2.Listener:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )
    chain = listener_components_pb2.FilterChain(
        filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=_pack(hcm)
            )
        ]
    )
    return listener_pb2.Listener(name=name, address=address, filter_chains=[chain])


def _http_filter(name: str, config: Message) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=name, typed_config=_pack(config))


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed
