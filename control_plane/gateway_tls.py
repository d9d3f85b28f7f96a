"""TLS on the gateway's gRPC listener, from tritonserver's own flags.

A Triton launch script serves gRPC over TLS with ``--grpc-use-ssl`` (``--grpc-server-cert``,
``--grpc-server-key``) and asks clients for certificates with ``--grpc-use-ssl-mutual``
(verified against ``--grpc-root-cert``). In the mesh, clients reach Envoy, so TLS ends there:
``meshserve up`` takes the flags (``add_tls_flags``, ``tls_from_args``), hands them to the control
plane (``tls_argv``), and the control plane puts ``downstream_tls`` on the gRPC listener.
The listener names its certificate and the clients' CA as SDS secrets, which the control plane
serves over the same ADS stream from the files' contents and re-reads while serving, so a
rotated certificate takes effect without a restart (control_plane/gateway_secrets.py). The
files are checked at start (``check_files``): a certificate and the key that belongs to it, CA
certificates that parse. The REST listener stays plaintext, as Triton's HTTP endpoint has no
TLS either.

The mesh's own gRPC callers (BLS calls from Python models) do not hold the clients'
certificates: with TLS on, the control plane adds a plaintext gRPC listener with the same routes
on ``--gateway-internal-grpc-port``, bound to loopback only (``meshserve up`` picks a free port
and points its services there). Services on other hosts cannot reach it, so a multi-host
deployment with TLS has no BLS through the gateway.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import any_pb2

from services.core.flag_values import readable_file
from services.core.server_flags import GATEWAY_TLS_FLAGS, triton_bool

INTERNAL_GRPC_LISTENER = "grpc-internal"
#: where the plaintext twin listens: never a network address
LOOPBACK = "127.0.0.1"
#: the SDS secrets the gRPC listener names (control_plane/gateway_secrets.py serves them)
SERVER_CERT_SECRET = "gateway-grpc-certificate"
CLIENT_CA_SECRET = "gateway-grpc-client-ca"


@dataclass(frozen=True, slots=True)
class GatewayTls:
    """The gRPC listener's certificate, and whether (and against what) it checks clients'."""

    server_cert: str
    server_key: str
    #: CA certificates the clients' certificates must chain to (mutual TLS)
    root_cert: str = ""
    mutual: bool = False


def add_tls_flags(p: argparse._ActionsContainer) -> None:
    """Triton's gRPC TLS flags, as tritonserver spells them."""
    use, mutual, cert, key, root = GATEWAY_TLS_FLAGS
    for flag in (use, mutual):
        p.add_argument(flag, nargs="?", const="true", default="false", metavar="true|false")
    p.add_argument(cert, default="", metavar="PEM", help="the gateway's gRPC certificate (chain)")
    p.add_argument(key, default="", metavar="PEM", help="its private key")
    p.add_argument(root, default="", metavar="PEM", help="CA certificates clients must chain to")


def _readable(flag: str, path: str) -> str:
    if not readable_file(path):
        raise ValueError(f"{flag} {path}: no such readable file")
    return str(Path(path).resolve())


def tls_from_args(a: argparse.Namespace) -> GatewayTls | None:
    """The flags given (``add_tls_flags``) as GatewayTls; None for plaintext. ValueError saying
    what to give for an incomplete or unreadable set."""
    use_flag, mutual_flag, cert_flag, key_flag, root_flag = GATEWAY_TLS_FLAGS
    mutual = triton_bool(mutual_flag, a.grpc_use_ssl_mutual)
    use = triton_bool(use_flag, a.grpc_use_ssl) or mutual
    files = {
        cert_flag: a.grpc_server_cert,
        key_flag: a.grpc_server_key,
        root_flag: a.grpc_root_cert,
    }
    if not use:
        given = [flag for flag, path in files.items() if path]
        if given:
            raise ValueError(
                f"{', '.join(given)} given without {use_flag}: give {use_flag}=true to serve "
                "gRPC over TLS, or leave the certificates out"
            )
        return None
    needed = [cert_flag, key_flag, *([root_flag] if mutual else [])]
    missing = [flag for flag in needed if not files[flag]]
    if missing:
        why = f"{mutual_flag} needs" if mutual else f"{use_flag} needs"
        raise ValueError(f"{why} {' and '.join(missing)}")
    tls = GatewayTls(
        server_cert=_readable(cert_flag, a.grpc_server_cert),
        server_key=_readable(key_flag, a.grpc_server_key),
        root_cert=_readable(root_flag, a.grpc_root_cert) if a.grpc_root_cert else "",
        mutual=mutual,
    )
    check_files(tls)
    return tls


def _no_password() -> bytes:
    raise ValueError("the key is encrypted")


def check_files(tls: GatewayTls) -> None:
    """ValueError naming the file and what is wrong unless the certificate chain and the key are
    PEM and belong together (an encrypted key is refused: Envoy cannot read it), and, in mutual
    mode, the root file holds CA certificates."""
    _, _, cert, key, root = GATEWAY_TLS_FLAGS
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(tls.server_cert, tls.server_key, password=_no_password)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise ValueError(
            f"{cert} {tls.server_cert} and {key} {tls.server_key}: not a PEM certificate chain "
            f"and the unencrypted private key that belongs to it ({exc})"
        ) from None
    if not tls.mutual:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.root_cert)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{root} {tls.root_cert}: no PEM CA certificate in it ({exc})") from None


def tls_argv(tls: GatewayTls | None) -> list[str]:
    """The same settings as flags (what the control plane is given)."""
    if tls is None:
        return []
    use, mutual, cert, key, root = GATEWAY_TLS_FLAGS
    argv = [f"{use}=true", f"{cert}={tls.server_cert}", f"{key}={tls.server_key}"]
    argv += [f"{root}={tls.root_cert}"] if tls.root_cert else []
    return argv + ([f"{mutual}=true"] if tls.mutual else [])


def _over_ads(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(
        name=name,
        sds_config=config_source_pb2.ConfigSource(
            ads=config_source_pb2.AggregatedConfigSource(),
            resource_api_version=config_source_pb2.ApiVersion.V3,
        ),
    )


def downstream_tls(tls: GatewayTls) -> base_pb2.TransportSocket:
    """Envoy's TLS for the gRPC listener: the server certificate (SDS secret
    ``SERVER_CERT_SECRET``), ALPN h2 (gRPC) and HTTP/1.1, and with ``mutual`` a client
    certificate required and verified against the root certificates (``CLIENT_CA_SECRET``)."""
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(alpn_protocols=["h2", "http/1.1"])
    )
    common = context.common_tls_context
    common.tls_certificate_sds_secret_configs.append(_over_ads(SERVER_CERT_SECRET))
    if tls.mutual:  # as in Triton, the root certificate only checks clients in mutual TLS
        common.validation_context_sds_secret_config.CopyFrom(_over_ads(CLIENT_CA_SECRET))
        context.require_client_certificate.value = True
    packed = any_pb2.Any()
    packed.Pack(context, deterministic=True)
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=packed)
