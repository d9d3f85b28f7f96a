"""The address a service registers: always an IP (Envoy takes EDS endpoints by IP only)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from services.core.identity import advertised_address, service_identity


def test_an_ip_bind_is_advertised_as_is() -> None:
    assert advertised_address("127.0.0.1") == "127.0.0.1"
    assert advertised_address("::1") == "::1"


def test_advertise_host_wins_over_the_bind() -> None:
    assert advertised_address("0.0.0.0", "10.1.2.3") == "10.1.2.3"
    assert advertised_address("127.0.0.1", "10.1.2.3") == "10.1.2.3"


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", ""])
def test_a_wildcard_bind_advertises_this_machines_address(wildcard: str) -> None:
    address = advertised_address(wildcard)
    ipaddress.ip_address(address)  # an IP, not the host name
    assert address == socket.gethostbyname(socket.gethostname())


def test_a_name_is_resolved_and_an_unknown_one_says_what_to_do() -> None:
    assert advertised_address("localhost") in ("127.0.0.1", "::1")
    with pytest.raises(ValueError, match="--advertise-host"):
        advertised_address("no-such-host.invalid")


def test_identity_carries_the_advertised_address() -> None:
    identity = service_identity("onnx", "0.0.0.0", 9001, -1, 9002, advertise_host="10.0.0.7")
    assert identity.host == "10.0.0.7"
    assert (identity.grpc_port, identity.http_port, identity.metrics_port) == (9001, 0, 9002)
