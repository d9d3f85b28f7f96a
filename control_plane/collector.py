"""How the gateway reaches the trace collector: its address and protocol, TLS and headers.

Data flow: ``control_plane.tracing.gateway_tracing`` names the collector's URL (Triton's
``--trace-config opentelemetry,url=`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``) and ``collector_at``
adds what the standard exporter variables say (``services.core.otlp_env``): an ``https://`` URL
is reached over TLS, verified against ``OTEL_EXPORTER_OTLP_CERTIFICATE`` or the system's roots
and the collector's host name, with the client certificate if one is set; the headers go with
every export. ``collector_cluster`` is that as Envoy's cluster; ``tracing.hcm_tracing`` sends
the headers as the tracer's request headers (OTLP/HTTP) or gRPC metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2

from gateway.bootstrap import is_ip
from services.core import otlp_env

COLLECTOR_CLUSTER = "otel-collector"
_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS_SOCKET = "envoy.transport_sockets.tls"


@dataclass(frozen=True, slots=True)
class Collector:
    """Where the gateway's spans go, and how."""

    host: str
    port: int
    #: OTLP/HTTP: the path spans are POSTed to (e.g. "/v1/traces"); "": OTLP/gRPC
    http_path: str = ""
    #: an https:// collector: TLS, its certificate checked against ``ca_file`` and ``host``
    tls: bool = False
    #: "" with TLS: the system's root certificates
    ca_file: str = ""
    client_certificate: str = ""
    client_key: str = ""
    #: sent with every export (names in lower case)
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}{self.http_path}"


def collector_at(url: str, env: Mapping[str, str], *, http: bool) -> Collector:
    """The collector at an ``http(s)://`` URL (OTLP/HTTP when ``http``, else OTLP/gRPC), reached
    as the exporter variables in ``env`` say; ValueError for another scheme or a bad variable."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the trace collector {url!r} is not an http:// or https:// URL")
    problem = otlp_env.problem(env)
    if problem:
        raise ValueError(problem)
    tls = parts.scheme == "https"
    files = otlp_env.tls_files(env) if tls else {}
    plain_port = 80 if http else 4317
    return Collector(
        host=parts.hostname,
        port=parts.port or (443 if tls else plain_port),
        http_path=(parts.path or "/") if http else "",
        tls=tls,
        ca_file=files.get(otlp_env.CA_FILE, ""),
        client_certificate=files.get(otlp_env.CLIENT_CERTIFICATE, ""),
        client_key=files.get(otlp_env.CLIENT_KEY, ""),
        headers=otlp_env.headers(env),
    )


def tls_socket(collector: Collector) -> base_pb2.TransportSocket:
    """Envoy's upstream TLS to the collector: the server's certificate must chain to the CA file
    (or the system's roots) and name the collector's host; SNI is the host when it is a name."""
    san = tls_common_pb2.SubjectAltNameMatcher(
        san_type=(
            tls_common_pb2.SubjectAltNameMatcher.IP_ADDRESS
            if is_ip(collector.host)
            else tls_common_pb2.SubjectAltNameMatcher.DNS
        ),
        matcher=string_pb2.StringMatcher(exact=collector.host),
    )
    validation = tls_common_pb2.CertificateValidationContext(match_typed_subject_alt_names=[san])
    if collector.ca_file:
        validation.trusted_ca.filename = collector.ca_file
    else:
        validation.system_root_certs.SetInParent()
    common = tls_pb2.CommonTlsContext(
        validation_context=validation,
        alpn_protocols=["http/1.1"] if collector.http_path else ["h2"],
    )
    if collector.client_certificate:
        certificate = common.tls_certificates.add()
        certificate.certificate_chain.filename = collector.client_certificate
        certificate.private_key.filename = collector.client_key
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=common, sni="" if is_ip(collector.host) else collector.host
    )
    packed = any_pb2.Any()
    packed.Pack(context, deterministic=True)
    return base_pb2.TransportSocket(name=_TLS_SOCKET, typed_config=packed)


def collector_cluster(collector: Collector) -> cluster_pb2.Cluster:
    """The collector as a cluster (HTTP/2 for OTLP/gRPC, HTTP/1.1 for OTLP/HTTP; TLS for an
    https:// one): STATIC for an IP address, else resolved by DNS."""
    explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
        http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
    )
    if collector.http_path:
        explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        )
    options = any_pb2.Any()
    options.Pack(
        http_protocol_options_pb2.HttpProtocolOptions(explicit_http_config=explicit),
        deterministic=True,
    )
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=collector.host, port_value=collector.port
                )
            )
        )
    )
    kind = cluster_pb2.Cluster.STATIC if is_ip(collector.host) else cluster_pb2.Cluster.STRICT_DNS
    cluster = cluster_pb2.Cluster(
        name=COLLECTOR_CLUSTER,
        type=kind,
        connect_timeout=duration_pb2.Duration(seconds=1),
        typed_extension_protocol_options={_PROTOCOL_OPTIONS: options},
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=COLLECTOR_CLUSTER,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )
    if collector.tls:
        cluster.transport_socket.CopyFrom(tls_socket(collector))
    return cluster
