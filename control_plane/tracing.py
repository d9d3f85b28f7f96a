"""The gateway's own OpenTelemetry tracing: what the control plane tells Envoy to trace with.

Data flow: the control plane reads Triton's tracing flags (``--trace-config``, as ``meshserve up``
hands them on) and the standard OTLP variables once at start (``gateway_tracing``); with a
collector named, ``translate`` adds ``collector.collector_cluster`` (a cluster to the
collector: HTTP/1.1 for OTLP/HTTP, HTTP/2 for OTLP/gRPC, TLS for an ``https://`` one) and both
listeners' connection managers get ``hcm_tracing``: Envoy's ``envoy.tracers.opentelemetry``
tracer, exporting its spans (service ``meshserve-gateway``, with the resource attributes the
services have) to that cluster, with the exporter headers. Envoy joins the caller's W3C trace
context when the request carries one, starts a trace otherwise (``random_sampling`` percent of
requests), and sends ``traceparent`` upstream, so the services' spans are children of the gateway's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

from envoy.config.core.v3 import (
    base_pb2,
    extension_pb2,
    grpc_service_pb2,
    http_service_pb2,
    http_uri_pb2,
)
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.tracers.opentelemetry.resource_detectors.v3 import (
    static_config_resource_detector_pb2 as static_resource_pb2,
)
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2

from control_plane.collector import COLLECTOR_CLUSTER, Collector, collector_at
from services.core import otlp_env
from services.core.trace_config import OPENTELEMETRY, TRITON_DEFAULTS, TraceFlags, otlp_endpoint

log = logging.getLogger(__name__)

GATEWAY_SERVICE_NAME = "meshserve-gateway"
TRACER = "envoy.tracers.opentelemetry"
_STATIC_RESOURCE = "envoy.tracers.opentelemetry.resource_detectors.static_config"


@dataclass(frozen=True, slots=True)
class GatewayTracing:
    """Where the gateway exports its spans, and which share of new traces it samples."""

    collector: Collector
    #: percent of requests without a sampled caller context that start a trace (0-100)
    sampling_percent: float = 100.0
    service_name: str = GATEWAY_SERVICE_NAME
    #: resource attributes besides ``service.name`` (the services' own, from the same flags and
    #: ``OTEL_RESOURCE_ATTRIBUTES``)
    resource: tuple[tuple[str, str], ...] = ()


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
    """The gateway's tracing from ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` (OTLP/gRPC) and the
    sampler variables; None (no tracing) when no endpoint is set. ValueError: see
    ``collector_at``."""
    endpoint = otlp_endpoint(env)
    if not endpoint:
        return None
    return GatewayTracing(
        collector=collector_at(endpoint, env, http=False),
        sampling_percent=sampling_percent(
            env.get("OTEL_TRACES_SAMPLER", ""), env.get("OTEL_TRACES_SAMPLER_ARG", "")
        ),
        resource=_resource(TraceFlags(), env),
    )


def _resource(flags: TraceFlags, env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``OTEL_RESOURCE_ATTRIBUTES`` with ``opentelemetry,resource=`` over them, as the services
    have them, less ``service.name`` (the gateway keeps its own)."""
    merged = dict(otlp_env.resource_attributes(env)) | dict(flags.resource)
    merged.pop("service.name", None)
    return tuple(merged.items())


def gateway_tracing(flags: TraceFlags, env: Mapping[str, str]) -> GatewayTracing | None:
    """The gateway's tracing: Triton's ``--trace-config mode=opentelemetry`` (OTLP/HTTP to its
    URL, sampling by its rate and level, Triton's defaults for those not given), else the OTLP
    variables (``gateway_tracing_from_env``) with the rate and level given, if any. ValueError
    when the collector cannot be reached as named (``collector.collector_at``)."""
    if flags.mode != OPENTELEMETRY:
        tracing = gateway_tracing_from_env(env)
        if tracing is None or (flags.level != "OFF" and flags.rate is None):
            return tracing  # the sampler variables' share
        percent = percent_for(flags.level or "TIMESTAMPS", 1 if flags.rate is None else flags.rate)
        return replace(tracing, sampling_percent=percent)
    start = flags.start_settings(TRITON_DEFAULTS)
    return GatewayTracing(
        collector=collector_at(flags.url, env, http=True),
        sampling_percent=percent_for(start.level, start.rate),
        resource=_resource(flags, env),
    )


def hcm_tracing(tracing: GatewayTracing) -> hcm_pb2.HttpConnectionManager.Tracing:
    """A connection manager's ``tracing``: the OpenTelemetry tracer exporting to the collector,
    with the exporter headers and the resource attributes."""
    timeout = duration_pb2.Duration(seconds=1)
    collector = tracing.collector
    config = opentelemetry_pb2.OpenTelemetryConfig(service_name=tracing.service_name)
    if collector.http_path:
        config.http_service.CopyFrom(
            http_service_pb2.HttpService(
                http_uri=http_uri_pb2.HttpUri(
                    uri=collector.url, cluster=COLLECTOR_CLUSTER, timeout=timeout
                ),
                request_headers_to_add=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=key, value=value),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                    for key, value in collector.headers
                ],
            )
        )
    else:
        config.grpc_service.CopyFrom(
            grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=COLLECTOR_CLUSTER),
                timeout=timeout,
                initial_metadata=[
                    base_pb2.HeaderValue(key=key, value=value) for key, value in collector.headers
                ],
            )
        )
    if tracing.resource:
        detector = any_pb2.Any()
        detector.Pack(
            static_resource_pb2.StaticConfigResourceDetectorConfig(
                attributes=dict(tracing.resource)
            ),
            deterministic=True,
        )
        config.resource_detectors.append(
            extension_pb2.TypedExtensionConfig(name=_STATIC_RESOURCE, typed_config=detector)
        )
    packed = any_pb2.Any()
    packed.Pack(config, deterministic=True)
    return hcm_pb2.HttpConnectionManager.Tracing(
        provider=http_tracer_pb2.Tracing.Http(name=TRACER, typed_config=packed),
        random_sampling=percent_pb2.Percent(value=tracing.sampling_percent),
    )
