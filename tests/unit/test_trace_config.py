"""Triton's tracing flags (services/core/trace_config.py): what each form sets, the ones refused
with what to do instead, how they start a service's tracing (tracing_sdk.build, not installed)
and the gateway's (control_plane.tracing), and that `meshserve up` hands them to both."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from control_plane.__main__ import settings_from_args as control_plane_settings
from control_plane.collector import collector_cluster
from control_plane.tracing import gateway_tracing, hcm_tracing
from deploy.cli import build_parser, up_settings
from deploy.supervisor import control_plane_command, service_argv
from services.core.settings import settings_from_args
from services.core.trace_config import (
    DEFAULT_URL,
    TraceFlags,
    collector_problem,
    parse,
    traces_url,
)
from services.core.trace_settings import TraceSettings
from services.core.tracing_sdk import TraceControl, build

ENV = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}


def _config(*values: str) -> TraceFlags:
    return parse([("--trace-config", v) for v in values])


def _batch_processor(control: TraceControl) -> BatchSpanProcessor:
    processors = control.provider._active_span_processor._span_processors
    assert len(processors) == 1 and isinstance(processors[0], BatchSpanProcessor)
    return processors[0]


def test_the_documented_opentelemetry_form_sets_every_field() -> None:
    flags = _config(
        "mode=opentelemetry",
        "opentelemetry,url=collector:4318/v1/traces",
        "opentelemetry,resource=service.name=triton",
        "opentelemetry,resource=service.version=1",
        "opentelemetry,bsp_max_queue_size=100",
        "opentelemetry,bsp_schedule_delay=50",
        "opentelemetry,bsp_max_export_batch_size=10",
        "rate=100",
        "level=TIMESTAMPS",
        "count=7",
    )
    assert flags == TraceFlags(
        mode="opentelemetry",
        url="http://collector:4318/v1/traces",
        resource=(("service.name", "triton"), ("service.version", "1")),
        bsp=(("max_queue_size", 100), ("schedule_delay_millis", 50), ("max_export_batch_size", 10)),
        level="TIMESTAMPS",
        rate=100,
        count=7,
    )
    # what the control plane is handed parses back to the same
    assert _config(*flags.as_trace_config()) == flags


def test_urls_default_and_complete_like_tritons() -> None:
    assert _config("mode=opentelemetry").url == DEFAULT_URL == "http://localhost:4318/v1/traces"
    assert traces_url("collector:4318") == "http://collector:4318/v1/traces"
    assert (
        traces_url("https://otel.example:443/api/traces") == "https://otel.example:443/api/traces"
    )
    # an opentelemetry setting implies the mode (Triton would trace to files and ignore it)
    assert _config("opentelemetry,url=127.0.0.1:9/x").mode == "opentelemetry"
    for bad in ("ftp://x/v1/traces", "://", "host:port/v1"):
        with pytest.raises(ValueError, match="url="):
            traces_url(bad)


def test_the_older_flags_are_the_global_settings_and_the_last_one_counts() -> None:
    flags = parse(
        [
            ("--trace-rate", "5"),
            ("--trace-level", "TIMESTAMPS"),
            ("--trace-count", "3"),
            ("--trace-config", "rate=9"),
            ("--trace-level", "off"),
        ]
    )
    assert (flags.mode, flags.level, flags.rate, flags.count) == ("", "OFF", 9, 3)
    assert parse([]) == TraceFlags()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (("--trace-file", "/tmp/trace.json"), "trace files (mode triton) are not written"),
        (("--trace-log-frequency", "50"), "trace files (mode triton) are not written"),
        (("--trace-config", "triton,file=/tmp/trace.json"), "opentelemetry,url=HOST:PORT"),
        (("--trace-config", "mode=triton"), "trace files (mode triton)"),
        (("--trace-config", "mode=jaeger"), "give mode=opentelemetry"),
        (("--trace-config", "zipkin,url=x"), "the mode is triton or opentelemetry"),
        (("--trace-config", "level=TENSORS"), "never tensor contents"),
        (("--trace-config", "level=ALL"), "give TIMESTAMPS or OFF"),
        (("--trace-config", "rate=-1"), "whole number >= 0"),
        (("--trace-config", "count=-2"), "whole number >= -1"),
        (("--trace-config", "rate"), "<setting>=<value>"),
        (("--trace-config", "sample=1"), "unknown setting 'sample'"),
        (("--trace-config", "opentelemetry,headers=a=b"), "unknown opentelemetry setting"),
        (("--trace-config", "opentelemetry,resource=novalue"), "resource=<key>=<value>"),
        (("--trace-config", "opentelemetry,bsp_schedule_delay=0"), "whole number >= 1"),
        (("--trace-config", "opentelemetry,bsp_max_export_batch_size=4096"), "2048 (the default)"),
    ],
)
def test_refused_and_bad_forms_say_what_to_give(given: tuple[str, str], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse([given])
    assert message in str(caught.value)


def test_start_settings_take_tritons_defaults_in_opentelemetry_mode() -> None:
    base = TraceSettings(level="TIMESTAMPS", rate=1, count=-1)  # the OTEL_* sampler's
    assert _config("mode=opentelemetry").start_settings(base) == TraceSettings("OFF", 1000, -1)
    assert _config("mode=opentelemetry", "level=TIMESTAMPS", "rate=2").start_settings(
        base
    ) == TraceSettings("TIMESTAMPS", 2, -1)
    assert _config("count=4").start_settings(base) == TraceSettings("TIMESTAMPS", 1, 4)


def test_timestamps_without_a_collector_is_refused_before_start() -> None:
    asked = _config("level=TIMESTAMPS")
    assert "no collector is named" in (collector_problem(asked, {}) or "")
    assert collector_problem(asked, ENV) is None
    assert collector_problem(_config("mode=opentelemetry", "level=TIMESTAMPS"), {}) is None
    assert collector_problem(_config("rate=5"), {}) is None


def test_opentelemetry_mode_builds_an_otlp_http_exporter_with_the_settings() -> None:
    flags = _config(
        "opentelemetry,url=127.0.0.1:4318/v1/traces",
        "opentelemetry,resource=service.name=triton-a",
        "opentelemetry,resource=deployment=blue",
        "opentelemetry,bsp_schedule_delay=25",
        "opentelemetry,bsp_max_queue_size=64",
        "opentelemetry,bsp_max_export_batch_size=16",
        "level=TIMESTAMPS",
    )
    control = build("meshserve-onnx", {}, flags=flags)
    assert control is not None
    try:
        assert (control.protocol, control.endpoint) == ("HTTP", "http://127.0.0.1:4318/v1/traces")
        assert control.service_name == "triton-a"
        attributes = control.provider.resource.attributes
        assert (attributes["service.name"], attributes["deployment"]) == ("triton-a", "blue")
        processor = _batch_processor(control)._batch_processor
        assert isinstance(processor._exporter, HttpExporter)
        assert (processor._schedule_delay_millis, processor._max_queue_size) == (25, 64)
        settings = control.settings.get()
        assert (settings["trace_level"], settings["trace_rate"]) == (["TIMESTAMPS"], ["1000"])
    finally:
        control.shutdown()


def test_without_the_mode_the_otel_variables_decide_and_the_settings_start_them() -> None:
    assert build("meshserve-onnx", {}, flags=_config("rate=3")) is None
    control = build("meshserve-onnx", ENV, flags=_config("rate=3", "count=2"))
    assert control is not None
    try:
        assert (control.protocol, control.service_name) == ("gRPC", "meshserve-onnx")
        processor = _batch_processor(control)._batch_processor
        assert isinstance(processor._exporter, GrpcExporter)
        settings = control.settings.get()
        assert (settings["trace_level"], settings["trace_rate"]) == (["TIMESTAMPS"], ["3"])
        assert settings["trace_count"] == ["2"]
    finally:
        control.shutdown()


def test_the_gateway_exports_over_otlp_http_with_the_same_sampling() -> None:
    tracing = gateway_tracing(
        _config("opentelemetry,url=127.0.0.1:4318/v1/traces", "level=TIMESTAMPS", "rate=4"), {}
    )
    assert tracing is not None
    collector = tracing.collector
    assert (collector.host, collector.port, collector.http_path) == (
        "127.0.0.1",
        4318,
        "/v1/traces",
    )
    assert tracing.sampling_percent == 25.0
    config = opentelemetry_pb2.OpenTelemetryConfig()
    assert hcm_tracing(tracing).provider.typed_config.Unpack(config)
    assert config.http_service.http_uri.uri == "http://127.0.0.1:4318/v1/traces"
    assert not config.HasField("grpc_service")
    options = http_protocol_options_pb2.HttpProtocolOptions()
    cluster = collector_cluster(collector)
    next(iter(cluster.typed_extension_protocol_options.values())).Unpack(options)
    assert options.explicit_http_config.HasField("http_protocol_options")  # HTTP/1.1
    # Triton's default level is OFF: the gateway starts no trace either
    off = gateway_tracing(_config("mode=opentelemetry"), {})
    assert off is not None and off.sampling_percent == 0.0
    # without the mode, the OTLP/gRPC variables name the collector and the rate samples
    from_env = gateway_tracing(_config("rate=10"), ENV)
    assert from_env is not None and from_env.sampling_percent == 10.0
    assert from_env.collector.http_path == ""
    from_env_off = gateway_tracing(_config("level=OFF"), ENV)
    assert from_env_off is not None and from_env_off.sampling_percent == 0.0
    ratio = {**ENV, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    from_sampler = gateway_tracing(_config("level=TIMESTAMPS"), ratio)
    assert from_sampler is not None and from_sampler.sampling_percent == 50.0
    https = gateway_tracing(_config("mode=opentelemetry", "opentelemetry,url=https://x/t"), {})
    assert https is not None and (https.collector.tls, https.collector.port) == (True, 443)


def test_up_hands_the_trace_flags_to_every_service_and_the_control_plane(tmp_path: Path) -> None:
    given = [
        "--trace-config=mode=opentelemetry",
        "--trace-config",
        "opentelemetry,url=127.0.0.1:4318/v1/traces",
        "--trace-config=level=TIMESTAMPS",
        "--trace-rate=2",
    ]
    mesh = up_settings(
        build_parser().parse_args(["up", "--model-repository", str(tmp_path), *given])
    )
    service = settings_from_args(service_argv(mesh, "onnx")[3:], "svc", "onnx")
    expected = _config("opentelemetry,url=127.0.0.1:4318/v1/traces", "level=TIMESTAMPS", "rate=2")
    assert service.flags.trace == expected
    plane = control_plane_settings(control_plane_command(mesh, fresh=True)[3:])
    assert plane.gateway_tracing == gateway_tracing(expected, {})
    assert plane.gateway_tracing is not None and plane.gateway_tracing.sampling_percent == 50.0


def test_up_refuses_timestamps_with_no_collector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    args = build_parser().parse_args(
        ["up", "--model-repository", str(tmp_path), "--trace-config=level=TIMESTAMPS"]
    )
    with pytest.raises(SystemExit, match="no collector is named"):
        up_settings(args)
