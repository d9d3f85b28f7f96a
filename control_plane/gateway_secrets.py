"""The gateway's TLS certificate and clients' CA as SDS secrets, re-read while serving.

Data flow: the files ``--grpc-server-cert``, ``--grpc-server-key`` and (mutual TLS)
``--grpc-root-cert`` name ─▶ ``read_material`` (read, checked with ``gateway_tls.check_files``)
─▶ ``tls_secrets`` (Secret resources holding the contents) ─▶ the snapshot ─▶ Envoy, whose gRPC
listener names them (``gateway_tls.downstream_tls``).

Rotation: ``CertificateWatch`` reads the files again every ``interval`` seconds. When their
contents changed and check out, the control plane publishes a snapshot with the new secrets;
Envoy's next TLS handshakes use them, while connections already open keep theirs (the listener
is neither rebuilt nor drained). However the files are replaced (written in place, renamed over,
a Kubernetes secret volume's symlink swap), what counts is what they hold. Contents that do not
check (a key written before its certificate, a key that belongs to another certificate, a
half-written file) are logged once and the certificate in use stays until the files check again.

The secrets hold the private key: the ADS server gives them only to streams from this host
(control_plane/ads.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from control_plane.gateway_tls import (
    CLIENT_CA_SECRET,
    SERVER_CERT_SECRET,
    GatewayTls,
    check_files,
)
from services.core.server_flags import GATEWAY_TLS_FLAGS

log = logging.getLogger(__name__)

#: how often the files are read again
RELOAD_SECS = 2.0
_FIRST_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """What the files held when read: PEM bytes (``client_ca`` empty unless mutual)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes = b""

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the (first) certificate, as ``openssl x509 -fingerprint -sha256`` shows
        it, for the logs."""
        first = _FIRST_CERT.search(self.certificate_chain)
        if first is None:
            return "?"
        der = ssl.PEM_cert_to_DER_cert(first.group(0).decode("ascii", "replace"))
        return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _read(tls: GatewayTls) -> TlsMaterial:
    _, _, cert_flag, key_flag, root_flag = GATEWAY_TLS_FLAGS
    files = [(cert_flag, tls.server_cert), (key_flag, tls.server_key)]
    files += [(root_flag, tls.root_cert)] if tls.mutual else []
    contents = []
    for flag, path in files:
        try:
            contents.append(Path(path).read_bytes())
        except OSError as exc:
            raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    return TlsMaterial(*contents)


class Changing(ValueError):
    """The files changed while they were read and checked (read them again later)."""


def read_material(tls: GatewayTls) -> TlsMaterial:
    """The files' contents, checked: ValueError saying what is wrong (``Changing`` when they
    were being replaced meanwhile)."""
    before = _read(tls)
    check_files(tls)
    if _read(tls) != before:
        raise Changing("the certificate files changed while they were read")
    return before


def tls_secrets(tls: GatewayTls, material: TlsMaterial) -> list[secret_pb2.Secret]:
    """The secrets ``downstream_tls`` names, holding ``material``, sorted by name."""
    certificate = secret_pb2.Secret(name=SERVER_CERT_SECRET)
    certificate.tls_certificate.certificate_chain.inline_bytes = material.certificate_chain
    certificate.tls_certificate.private_key.inline_bytes = material.private_key
    secrets = [certificate]
    if tls.mutual:
        client_ca = secret_pb2.Secret(name=CLIENT_CA_SECRET)
        client_ca.validation_context.trusted_ca.inline_bytes = material.client_ca
        secrets.append(client_ca)
    return sorted(secrets, key=lambda s: s.name)


class CertificateWatch:
    """The gateway's current TLS material, and the task that picks up rotated files."""

    def __init__(self, tls: GatewayTls, interval: float = RELOAD_SECS) -> None:
        self.tls = tls
        self.interval = interval
        #: raises ValueError when the files do not check at start
        self.material = read_material(tls)
        self._refusal = ""
        log.info(
            "gateway gRPC TLS: certificate %s (SHA-256 %s)%s",
            tls.server_cert,
            self.material.fingerprint,
            f", clients checked against {tls.root_cert}" if tls.mutual else "",
        )

    def secrets(self) -> list[secret_pb2.Secret]:
        return tls_secrets(self.tls, self.material)

    def poll(self) -> bool:
        """Read the files again; True when they hold new material that checks (now current)."""
        try:
            material = read_material(self.tls)
        except Changing:
            return False  # the next poll sees them settled
        except ValueError as exc:
            if str(exc) != self._refusal:
                self._refusal = str(exc)
                log.error(
                    "gateway gRPC TLS: keeping certificate %s in use, the files changed but do "
                    "not check: %s",
                    self.material.fingerprint,
                    exc,
                )
            return False
        self._refusal = ""
        if material == self.material:
            return False
        log.info(
            "gateway gRPC TLS: new handshakes use certificate %s (SHA-256 %s, was %s)%s",
            self.tls.server_cert,
            material.fingerprint,
            self.material.fingerprint,
            " and the clients' CA read again"
            if material.client_ca != self.material.client_ca
            else "",
        )
        self.material = material
        return True

    async def run(self, on_change: Callable[[], object]) -> None:
        """Poll forever; ``on_change()`` after each change taken (publishes a snapshot)."""
        while True:
            await asyncio.sleep(self.interval)
            if self.poll():
                on_change()
