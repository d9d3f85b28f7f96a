"""The gateway's TLS certificate as SDS secrets, re-read while serving
(control_plane/gateway_secrets.py): what the secrets hold, a rotation taken, a rotation that does
not check (a key of another certificate, a missing file, files changing while read) refused with
one log line while the certificate in use stays; the snapshot refusing a TLS listener whose
secrets are missing; and the ADS server giving secrets only to streams from this host.
Certificates come from tests.tls_certs (openssl)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from control_plane import gateway_secrets
from control_plane.ads import AdsServicer, _Stream, is_local_peer
from control_plane.gateway_secrets import CertificateWatch, TlsMaterial
from control_plane.gateway_tls import CLIENT_CA_SECRET, SERVER_CERT_SECRET, GatewayTls
from control_plane.snapshot import (
    SECRET,
    InconsistentSnapshot,
    SnapshotCache,
    check_consistency,
    make_snapshot,
)
from control_plane.translate import translate
from tests.tls_certs import OPENSSL, TlsFiles, make_tls_files, needs_openssl
from tests.unit.test_ads import request
from tests.unit.translate_support import mesh

pytestmark = needs_openssl


@pytest.fixture
def live(tmp_path: Path) -> tuple[GatewayTls, TlsFiles, TlsFiles]:
    """Mutual TLS on files in ``live/``, copied from pair ``a``; pair ``b`` to rotate to."""
    a, b = make_tls_files(tmp_path / "a"), make_tls_files(tmp_path / "b")
    folder = tmp_path / "live"
    folder.mkdir()
    for source in (a.server_cert, a.server_key, a.ca):
        shutil.copy(source, folder / source.name)
    tls = GatewayTls(
        str(folder / "server.pem"), str(folder / "server.key"), str(folder / "ca.pem"), mutual=True
    )
    return tls, a, b


def _held(watch: CertificateWatch) -> dict[str, secret_pb2.Secret]:
    return {secret.name: secret for secret in watch.secrets()}


def test_the_secrets_hold_the_files_and_a_rotation_is_taken(
    live: tuple[GatewayTls, TlsFiles, TlsFiles], caplog: pytest.LogCaptureFixture
) -> None:
    tls, a, b = live
    watch = CertificateWatch(tls, interval=0.01)
    held = _held(watch)
    assert set(held) == {SERVER_CERT_SECRET, CLIENT_CA_SECRET}
    certificate = held[SERVER_CERT_SECRET].tls_certificate
    assert certificate.certificate_chain.inline_bytes == a.server_cert.read_bytes()
    assert certificate.private_key.inline_bytes == a.server_key.read_bytes()
    assert held[CLIENT_CA_SECRET].validation_context.trusted_ca.inline_bytes == a.ca.read_bytes()
    assert not watch.poll()  # nothing changed
    for source in (b.server_cert, b.server_key, b.ca):
        shutil.copy(source, Path(tls.server_cert).parent / source.name)
    with caplog.at_level(logging.INFO, logger="control_plane.gateway_secrets"):
        assert watch.poll()
    held = _held(watch)
    assert (
        held[SERVER_CERT_SECRET].tls_certificate.certificate_chain.inline_bytes
        == b.server_cert.read_bytes()
    )
    assert held[CLIENT_CA_SECRET].validation_context.trusted_ca.inline_bytes == b.ca.read_bytes()
    assert TlsMaterial(b.server_cert.read_bytes(), b"").fingerprint in caplog.text
    assert not watch.poll()
    # one-way TLS has no CA secret
    one_way = CertificateWatch(GatewayTls(str(a.server_cert), str(a.server_key)))
    assert [s.name for s in one_way.secrets()] == [SERVER_CERT_SECRET]


def test_the_fingerprint_is_openssls(live: tuple[GatewayTls, TlsFiles, TlsFiles]) -> None:
    _, a, _ = live
    assert OPENSSL is not None
    shown = subprocess.run(
        [OPENSSL, "x509", "-in", str(a.server_cert), "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.strip().endswith("=" + TlsMaterial(a.server_cert.read_bytes(), b"").fingerprint)


def test_files_that_do_not_check_keep_the_certificate_in_use_and_log_once(
    live: tuple[GatewayTls, TlsFiles, TlsFiles], caplog: pytest.LogCaptureFixture
) -> None:
    tls, _, b = live
    watch = CertificateWatch(tls, interval=0.01)
    before = watch.secrets()
    shutil.copy(b.server_key, tls.server_key)  # the new key is there, its certificate not yet
    with caplog.at_level(logging.ERROR, logger="control_plane.gateway_secrets"):
        assert not watch.poll() and not watch.poll()
    (refusal,) = [r.getMessage() for r in caplog.records]
    assert "keeping certificate" in refusal and "--grpc-server-key" in refusal
    assert watch.secrets() == before
    shutil.copy(b.server_cert, tls.server_cert)  # now it is
    assert watch.poll() and watch.secrets() != before
    caplog.clear()
    Path(tls.root_cert).unlink()
    with caplog.at_level(logging.ERROR, logger="control_plane.gateway_secrets"):
        assert not watch.poll()
    assert "keeping certificate" in caplog.text and "ca.pem" in caplog.text
    with pytest.raises(ValueError, match="--grpc-root-cert"):
        CertificateWatch(tls)  # and at start the same files are refused


def test_files_changing_while_read_are_read_again_later(
    live: tuple[GatewayTls, TlsFiles, TlsFiles],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tls, _, b = live
    watch = CertificateWatch(tls, interval=0.01)
    check = gateway_secrets.check_files

    def rotating_meanwhile(checked: GatewayTls) -> None:
        check(checked)
        for source in (b.server_cert, b.server_key):
            shutil.copy(source, Path(tls.server_cert).parent / source.name)

    monkeypatch.setattr(gateway_secrets, "check_files", rotating_meanwhile)
    with caplog.at_level(logging.ERROR, logger="control_plane.gateway_secrets"):
        assert not watch.poll()
    assert not caplog.records  # not an error: the next poll reads them settled
    monkeypatch.setattr(gateway_secrets, "check_files", check)
    assert watch.poll()
    assert (
        _held(watch)[SERVER_CERT_SECRET].tls_certificate.private_key.inline_bytes
        == b.server_key.read_bytes()
    )


def test_a_tls_listener_needs_its_secrets_in_the_snapshot(
    live: tuple[GatewayTls, TlsFiles, TlsFiles],
) -> None:
    tls, _, _ = live
    res = translate(mesh(), grpc_port=8001, http_port=8000, tls=tls)
    with pytest.raises(InconsistentSnapshot) as refused:
        check_consistency(make_snapshot(res))
    assert f"listener 'grpc' names secret '{SERVER_CERT_SECRET}'" in str(refused.value)
    assert CLIENT_CA_SECRET in str(refused.value)
    res.secrets.extend(CertificateWatch(tls).secrets())
    snapshot = make_snapshot(res)
    check_consistency(snapshot)
    assert snapshot.names(SECRET) == {SERVER_CERT_SECRET, CLIENT_CA_SECRET}


def test_local_peers() -> None:
    assert is_local_peer("ipv4:127.0.0.1:41234")
    assert is_local_peer("ipv6:%5B::1%5D:5000") and is_local_peer("ipv6:[::1]:5000")
    assert is_local_peer("unix:/run/meshserve.sock")
    assert not is_local_peer("ipv4:192.0.2.7:41234")  # TEST-NET-1: on no host
    assert not is_local_peer("dns:example.com:80")


def test_secrets_go_only_to_streams_from_this_host(
    live: tuple[GatewayTls, TlsFiles, TlsFiles], caplog: pytest.LogCaptureFixture
) -> None:
    tls, _, _ = live
    res = translate(mesh(), grpc_port=8001, http_port=8000, tls=tls)
    res.secrets.extend(CertificateWatch(tls).secrets())
    snapshot = make_snapshot(res)
    ask = request(SECRET, names=(SERVER_CERT_SECRET,))
    servicer = AdsServicer(SnapshotCache())
    (local,) = _Stream(servicer, "ipv4:127.0.0.1:1", local=True).on_request(ask, snapshot)
    assert [r.type_url for r in local.resources] == [SECRET]
    with caplog.at_level(logging.ERROR, logger="control_plane.ads"):
        (remote,) = _Stream(servicer, "ipv4:192.0.2.7:1", local=False).on_request(ask, snapshot)
    assert list(remote.resources) == [] and remote.version_info == snapshot.version
    assert "not sending TLS secrets" in caplog.text and "192.0.2.7" in caplog.text
