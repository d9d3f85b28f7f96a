"""When a service passes a stream's requests for other services' models on
(services/core/stream_forward.py): only in a mesh, and never on a stream that is itself one
passed on (stale routes would otherwise send it round). The forwarding itself is tested through
a whole mesh (tests/e2e/conformance/test_stream_models.py)."""

from __future__ import annotations

import pytest

from services.core.gateway_client import GATEWAY_ENV
from services.core.mesh_caller import XDS_ENV
from services.core.stream_forward import FORWARDED_HEADER, forwarding


def test_only_in_a_mesh_and_never_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GATEWAY_ENV, raising=False)
    monkeypatch.delenv(XDS_ENV, raising=False)
    assert not forwarding()  # a service running alone answers NOT_FOUND itself
    monkeypatch.setenv(XDS_ENV, "127.0.0.1:8010")
    assert forwarding()
    monkeypatch.delenv(XDS_ENV)
    monkeypatch.setenv(GATEWAY_ENV, "127.0.0.1:8001")
    assert forwarding([("meshserve-model", "simple")])
    assert not forwarding([("meshserve-model", "simple"), (FORWARDED_HEADER, "1")])
