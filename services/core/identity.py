"""Who a service is to the mesh: its id, family, ports and the IP address it is reached at."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    """Where this service process is reached; ``id`` is unique and stable for its lifetime."""

    id: str
    family: str
    host: str
    grpc_port: int
    http_port: int = 0
    metrics_port: int = 0


def advertised_address(host: str, advertise_host: str = "") -> str:
    """The IP address the mesh reaches this service at: ``advertise_host`` when given, else the
    bound ``host`` (a wildcard bind: this machine's host name resolved). Envoy takes endpoints by
    IP address only, so a name is resolved here; raises ValueError when it cannot be."""
    wanted = advertise_host or ("" if host in ("", "0.0.0.0", "::") else host)
    name = wanted or socket.gethostname()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(name)
    except OSError as exc:
        raise ValueError(
            f"cannot resolve '{name}' to the IP address the mesh should reach this service at "
            f"({exc}); give it with --advertise-host"
        ) from None


def service_identity(
    family: str,
    host: str,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    advertise_host: str = "",
) -> ServiceIdentity:
    """This process's identity: id ``<family>-<hostname>-<pid>``, the IP address it is reached
    at (``advertised_address``); a port < 0 (listener disabled) is reported as 0."""
    hostname = socket.gethostname()
    advertised = advertised_address(host, advertise_host)
    return ServiceIdentity(
        id=f"{family}-{hostname}-{os.getpid()}",
        family=family,
        host=advertised,
        grpc_port=grpc_port,
        http_port=max(http_port, 0),
        metrics_port=max(metrics_port, 0),
    )
