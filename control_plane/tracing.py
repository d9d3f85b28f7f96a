"""The gateway's own OpenTelemetry tracing: what the control plane tells Envoy to trace with.

Data flow: the control plane reads Triton's tracing flags (``--trace-config``, as ``meshserve up``
hands them on) and the standard OTLP variables once at start (``gateway_tracing``); with a
collector named, ``translate`` adds ``collector_cluster`` (a cluster to the collector: HTTP/1.1
for OTLP/HTTP, HTTP/2 for OTLP/gRPC) and both listeners' connection managers get
``hcm_tracing``: Envoy's ``envoy.tracers.opentelemetry`` tracer, exporting its spans (service
``meshserve-gateway``) to that cluster. Envoy joins the caller's W3C trace context when the request
carries one, starts a trace otherwise (``random_sampling`` percent of requests), and sends
``traceparent`` upstream, so the services' spans are children of the gateway's.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    grpc_service_pb2,
    http_service_pb2,
    http_uri_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2

from services.core.trace_config import OPENTELEMETRY, TRITON_DEFAULTS, TraceFlags, otlp_endpoint

log = logging.getLogger(__name__)

COLLECTOR_CLUSTER = "otel-collector"
GATEWAY_SERVICE_NAME = "meshserve-gateway"
TRACER = "envoy.tracers.opentelemetry"
_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass(frozen=True, slots=True)
class GatewayTracing:
    """Where the gateway exports its spans, and which share of new traces it samples."""

    #: the collector (plaintext)
    host: str
    port: int
    #: percent of requests without a sampled caller context that start a trace (0-100)
    sampling_percent: float = 100.0
    service_name: str = GATEWAY_SERVICE_NAME
    #: OTLP/HTTP: the path spans are POSTed to (e.g. "/v1/traces"); "": OTLP/gRPC
    http_path: str = ""


def sampling_percent(sampler: str, arg: str) -> float:
    """``OTEL_TRACES_SAMPLER`` / ``..._ARG`` as Envoy's random-sampling percentage."""
    root = (sampler or "parentbased_always_on").strip().lower().removeprefix("parentbased_")
    if root == "always_off":
        return 0.0
    if root == "traceidratio":
        try:
            return min(max(float(arg), 0.0), 1.0) * 100 if arg.strip() else 100.0
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; the gateway samples all", arg)
    return 100.0


def percent_for(level: str, rate: int) -> float:
    """A trace level and rate as the gateway's random sampling: OFF → 0; rate N → 100/N percent
    (0 → 0)."""
    return 0.0 if level == "OFF" or rate <= 0 else 100.0 / rate


def percent_from_trace_settings(settings: Mapping[str, list[str]]) -> float | None:
    """Triton's global trace settings (as the services answer them) as the gateway's random
    sampling (``percent_for``). None when the answer holds neither setting."""
    level = settings.get("trace_level")
    if level is not None and "OFF" in level:
        return 0.0
    rate = settings.get("trace_rate")
    if not rate:
        return None if level is None else 100.0
    try:
        return percent_for("TIMESTAMPS", int(rate[0]))
    except ValueError:
        return None


def gateway_tracing_from_env(env: Mapping[str, str]) -> GatewayTracing | None:
    """The gateway's tracing from ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` and the sampler
    variables; None (no tracing) when no endpoint is set or it cannot be used."""
    endpoint = otlp_endpoint(env)
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        log.warning(
            "gateway tracing off: the gateway exports spans over plaintext OTLP/gRPC only "
            "(an http://host:port endpoint), got %r",
            endpoint,
        )
        return None
    return GatewayTracing(
        host=parts.hostname,
        port=parts.port or 4317,
        sampling_percent=sampling_percent(
            env.get("OTEL_TRACES_SAMPLER", ""), env.get("OTEL_TRACES_SAMPLER_ARG", "")
        ),
    )


def gateway_tracing(flags: TraceFlags, env: Mapping[str, str]) -> GatewayTracing | None:
    """The gateway's tracing: Triton's ``--trace-config mode=opentelemetry`` (OTLP/HTTP to its
    URL, sampling by its rate and level, Triton's defaults for those not given), else the OTLP
    variables (``gateway_tracing_from_env``) with the rate and level given, if any."""
    if flags.mode != OPENTELEMETRY:
        tracing = gateway_tracing_from_env(env)
        if tracing is None or (flags.level != "OFF" and flags.rate is None):
            return tracing  # the sampler variables' share
        percent = percent_for(flags.level or "TIMESTAMPS", 1 if flags.rate is None else flags.rate)
        return replace(tracing, sampling_percent=percent)
    parts = urlsplit(flags.url)
    if parts.scheme != "http" or not parts.hostname:
        log.warning(
            "gateway tracing off: the gateway exports spans over plaintext OTLP only "
            "(an http:// URL), got %r",
            flags.url,
        )
        return None
    start = flags.start_settings(TRITON_DEFAULTS)
    return GatewayTracing(
        host=parts.hostname,
        port=parts.port or 80,
        sampling_percent=percent_for(start.level, start.rate),
        http_path=parts.path or "/",
    )


def hcm_tracing(tracing: GatewayTracing) -> hcm_pb2.HttpConnectionManager.Tracing:
    """A connection manager's ``tracing``: the OpenTelemetry tracer exporting to the collector."""
    timeout = duration_pb2.Duration(seconds=1)
    if tracing.http_path:
        uri = f"http://{tracing.host}:{tracing.port}{tracing.http_path}"
        config = opentelemetry_pb2.OpenTelemetryConfig(
            http_service=http_service_pb2.HttpService(
                http_uri=http_uri_pb2.HttpUri(uri=uri, cluster=COLLECTOR_CLUSTER, timeout=timeout)
            ),
            service_name=tracing.service_name,
        )
    else:
        config = opentelemetry_pb2.OpenTelemetryConfig(
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=COLLECTOR_CLUSTER),
                timeout=timeout,
            ),
            service_name=tracing.service_name,
        )
    packed = any_pb2.Any()
    packed.Pack(config, deterministic=True)
    return hcm_pb2.HttpConnectionManager.Tracing(
        provider=http_tracer_pb2.Tracing.Http(name=TRACER, typed_config=packed),
        random_sampling=percent_pb2.Percent(value=tracing.sampling_percent),
    )


def collector_cluster(tracing: GatewayTracing) -> cluster_pb2.Cluster:
    """The collector as a cluster (HTTP/2 for OTLP/gRPC, HTTP/1.1 for OTLP/HTTP): STATIC for an
    IP address, else resolved by DNS."""
    is_ip = True
    try:
        ipaddress.ip_address(tracing.host)
    except ValueError:
        is_ip = False
    explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
        http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
    )
    if tracing.http_path:
        explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        )
    options = any_pb2.Any()
    options.Pack(
        http_protocol_options_pb2.HttpProtocolOptions(explicit_http_config=explicit),
        deterministic=True,
    )
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=tracing.host, port_value=tracing.port
                )
            )
        )
    )
    return cluster_pb2.Cluster(
        name=COLLECTOR_CLUSTER,
        type=cluster_pb2.Cluster.STATIC if is_ip else cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=duration_pb2.Duration(seconds=1),
        typed_extension_protocol_options={_PROTOCOL_OPTIONS: options},
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=COLLECTOR_CLUSTER,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )
