"""Throwaway TLS certificates for tests, made with the ``openssl`` command: a CA, a server
certificate it signed for 127.0.0.1 and localhost, and a client certificate (mutual TLS)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    assert OPENSSL is not None
    done = subprocess.run(
        [OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(map(str, args))}: {done.stderr}"


def _signed(folder: Path, name: str, ca: Path, ca_key: Path, extensions: str) -> None:
    key, csr, ext = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.ext"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN=meshserve-test-{name}")
    ext.write_text(extensions)
    _openssl(
        *("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"),
        *("-out", folder / f"{name}.pem", "-days", "2", "-sha256", "-extfile", ext),
    )


def make_tls_files(folder: Path) -> TlsFiles:
    """A CA and the certificates it signed, in ``folder`` (PEM)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ca_key)
    _openssl(
        *("req", "-x509", "-new", "-key", ca_key, "-out", ca, "-days", "2", "-sha256"),
        *("-subj", "/CN=meshserve-test-ca"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    _signed(
        folder,
        "server",
        ca,
        ca_key,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    _signed(
        folder,
        "client",
        ca,
        ca_key,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    return TlsFiles(
        ca=ca,
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
