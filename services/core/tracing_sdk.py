"""The OpenTelemetry SDK side of tracing: provider, OTLP exporter, run-time sampler.

Only process entry points reach this module (through ``tracing.configure_tracing``); the rest of
the code base uses the OpenTelemetry API (``tracing``). ``install`` builds a TracerProvider whose
resource names the service, a BatchSpanProcessor exporting over OTLP/HTTP (Triton's
``--trace-config mode=opentelemetry``, see ``trace_config``) or OTLP/gRPC (the ``OTEL_*``
variables), and a sampler that asks the process's ``TraceSettingsStore`` (Triton's TraceSetting
changes it while the service runs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import requests
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from services.core import otlp_env, tracing
from services.core.trace_config import (
    ENDPOINT_ENV,
    OPENTELEMETRY,
    TRACES_ENDPOINT_ENV,
    TRITON_DEFAULTS,
    TraceFlags,
    otlp_endpoint,
)
from services.core.trace_settings import TraceSettingsStore, settings_from_sampler

log = logging.getLogger(__name__)

SERVICE_NAME_ENV = "OTEL_SERVICE_NAME"
SAMPLER_ENV = "OTEL_TRACES_SAMPLER"
SAMPLER_ARG_ENV = "OTEL_TRACES_SAMPLER_ARG"
#: W3C tracestate key marking a trace a meshserve service sampled (and took from trace_count)
COUNTED_KEY = "meshserve"


class PinnedCaSession(requests.Session):
    """Verifies the collector with the CA file the exporter is given
    (``OTEL_EXPORTER_OTLP_CERTIFICATE``) also where ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``
    is set: requests lets those replace a session's ``verify``, so a collector with a private CA
    would be refused."""

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        merged: dict[str, Any] = super().merge_environment_settings(
            url, proxies, stream, verify, cert
        )
        merged["verify"] = self.verify if verify is None else verify
        return merged


def otlp_exporter(endpoint: str, protocol: str, env: Mapping[str, str]) -> SpanExporter:
    """The SDK's OTLP exporter (``protocol`` "HTTP" or "gRPC") with the TLS files of the standard
    variables as ``otlp_env`` reads them (each ``TRACES_`` one, else the general one: the rule the
    gateway follows too); the SDK reads the headers and the rest itself."""
    files = otlp_env.tls_files(env)
    ca_file = files.get(otlp_env.CA_FILE)
    if protocol == "HTTP":
        return HttpSpanExporter(
            endpoint=endpoint,
            certificate_file=ca_file,
            client_key_file=files.get(otlp_env.CLIENT_KEY),
            client_certificate_file=files.get(otlp_env.CLIENT_CERTIFICATE),
            session=PinnedCaSession() if ca_file else None,
        )
    if not endpoint.startswith("https://"):
        return OTLPSpanExporter(endpoint=endpoint)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(files.get(otlp_env.CLIENT_KEY)),
        certificate_chain=_read(files.get(otlp_env.CLIENT_CERTIFICATE)),
    )
    return OTLPSpanExporter(endpoint=endpoint, credentials=credentials)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class RuntimeSampler(Sampler):
    """Samples as the TraceSettingsStore says, reading the model name from the span's attributes."""

    def __init__(self, store: TraceSettingsStore) -> None:
        self.store = store

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        model = attributes.get(tracing.MODEL_NAME, "") if attributes else ""
        state = parent.trace_state if parent.is_valid else TraceState()
        sampled = self.store.should_sample(
            str(model),
            parent_valid=parent.is_valid,
            parent_remote=parent.is_remote,
            parent_sampled=parent.trace_flags.sampled,
            counted=COUNTED_KEY in state,
        )
        if not sampled:
            return SamplingResult(Decision.DROP, None, state)
        if COUNTED_KEY not in state:  # the services this trace reaches next do not count it
            state = state.add(COUNTED_KEY, "1")
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, state)

    def get_description(self) -> str:
        return "MeshserveTraceSettings"


class TraceControl:
    """The installed tracing of a process: its settings, and flush / shutdown of the exporter."""

    def __init__(
        self,
        provider: TracerProvider,
        settings: TraceSettingsStore,
        service_name: str,
        endpoint: str,
        protocol: str = "gRPC",
    ) -> None:
        self.provider = provider
        self.settings = settings
        self.service_name = service_name
        self.endpoint = endpoint
        #: "gRPC" or "HTTP" (OTLP over)
        self.protocol = protocol

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export every finished span now; False if the exporter did not finish in time."""
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Stop sampling, export what is pending, and close the exporter (at process exit)."""
        self.settings.disable()
        tracing.deactivate(self)
        self.provider.shutdown()
        log.info("tracing stopped: spans flushed to %s", self.endpoint)


def build(
    service_name_default: str,
    env: Mapping[str, str],
    exporter: SpanExporter | None = None,
    flags: TraceFlags | None = None,
) -> TraceControl | None:
    """A TraceControl for Triton's tracing ``flags`` (mode opentelemetry: OTLP/HTTP to their URL)
    or else ``env`` (OTLP/gRPC); None when neither names a collector. Not yet installed."""
    flags = flags or TraceFlags()
    if flags.mode == OPENTELEMETRY:
        endpoint, protocol, follow_parent = flags.url, "HTTP", True
        defaults = flags.start_settings(TRITON_DEFAULTS)
    else:
        endpoint, protocol = otlp_endpoint(env), "gRPC"
        base, follow_parent = settings_from_sampler(
            env.get(SAMPLER_ENV, ""), env.get(SAMPLER_ARG_ENV, "")
        )
        defaults = flags.start_settings(base)
    if not endpoint:
        return None
    store = TraceSettingsStore(defaults, follow_parent)
    attributes: dict[str, str] = {
        SERVICE_NAME: env.get(SERVICE_NAME_ENV, "").strip() or service_name_default,
        **dict(flags.resource),
    }
    provider = TracerProvider(sampler=RuntimeSampler(store), resource=Resource.create(attributes))
    if exporter is None:
        exporter = otlp_exporter(endpoint, protocol, env)
    bsp = dict(flags.bsp)
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=bsp.get("max_queue_size"),
            schedule_delay_millis=bsp.get("schedule_delay_millis"),
            max_export_batch_size=bsp.get("max_export_batch_size"),
        )
    )
    return TraceControl(provider, store, attributes[SERVICE_NAME], endpoint, protocol)


def install(
    service_name_default: str,
    env: Mapping[str, str] | None = None,
    flags: TraceFlags | None = None,
) -> TraceControl | None:
    """Build (see ``build``) and make it the process's global tracer provider."""
    control = build(service_name_default, os.environ if env is None else env, flags=flags)
    if control is None:
        log.debug("tracing off: neither %s nor %s is set", ENDPOINT_ENV, TRACES_ENDPOINT_ENV)
        return None
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        raise RuntimeError("tracing is already configured in this process; configure it once")
    trace.set_tracer_provider(control.provider)
    log.info(
        "tracing on: service '%s' exports spans over OTLP/%s to %s (sampling: %s)",
        control.service_name,
        control.protocol,
        control.endpoint,
        control.settings.get(),
    )
    if control.settings.get()["trace_level"] == ["OFF"]:
        log.warning(
            "trace level is OFF (Triton's default): no spans until --trace-config "
            "level=TIMESTAMPS, or TraceSetting turns it on"
        )
    return control
