"""The supervisor's readiness gates: each service's own gRPC health, and the gateway's ACK."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import grpc

from control_plane.admin import status_document
from control_plane.app import ControlPlane, ControlPlaneSettings
from deploy.supervisor import _not_serving, gateway_synced
from protos.gen.health import health_pb2_grpc as hgrpc
from services.core.health import HealthServicer
from tests.unit.test_registry_file import instance


def _doc(version: str, acked: dict[str, str]) -> dict[str, Any]:
    return {
        "snapshot_version": version,
        "gateways": {"gw": {t: {"acked_version": v} for t, v in acked.items()}},
    }


def test_gateway_synced_needs_every_type_acked_at_the_latest_version() -> None:
    types = ("Listener", "Cluster", "RouteConfiguration", "ClusterLoadAssignment")
    assert gateway_synced(_doc("v2", dict.fromkeys(types, "v2")))
    # make-before-break keeps removed clusters under "<version>+keep"
    assert gateway_synced(_doc("v2", {**dict.fromkeys(types, "v2"), "Cluster": "v2+keep"}))
    assert not gateway_synced(_doc("v2", {**dict.fromkeys(types, "v2"), "Cluster": "v1"}))
    assert not gateway_synced(_doc("v2", {}))
    assert not gateway_synced({"snapshot_version": "", "gateways": {}})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_not_serving_asks_each_service_health_endpoint() -> None:
    async def scenario() -> tuple[str, str, str]:
        health = HealthServicer()
        server = grpc.aio.server()
        hgrpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            doc = {"instances": [{"family": "onnx", "address": f"127.0.0.1:{port}"}]}
            before = await _not_serving(doc)
            await health.set_serving(True)
            after = await _not_serving(doc)
            gone = await _not_serving(
                {"instances": [{"family": "torch", "address": f"127.0.0.1:{_free_port()}"}]}
            )
        finally:
            await server.stop(None)
        return before, after, gone

    before, after, gone = asyncio.run(scenario())
    assert "service 'onnx'" in before and "NOT_SERVING" in before
    assert after == ""
    assert "service 'torch'" in gone and "unreachable (UNAVAILABLE)" in gone


def test_stop_order_puts_callers_first() -> None:
    from deploy.supervisor import stop_order

    assert stop_order(["onnx", "python", "ensemble", "torch"]) == [
        ["ensemble"],
        ["python"],
        ["onnx", "torch"],
    ]
    assert stop_order(["onnx"]) == [["onnx"]]
    assert stop_order(["python"]) == [["python"]]
    assert stop_order([]) == []


def test_a_registration_not_yet_published_holds_readiness_back(tmp_path: Path) -> None:
    """Between a service's registration and the snapshot routing to it (the reconcile task
    catches the service up first), the status says the routes are not current, so the mesh is
    not reported ready on the previous snapshot's ACK."""
    plane = ControlPlane(ControlPlaneSettings(policy_file=tmp_path / "p.json", warmup_secs=0))
    assert plane.registry is not None and plane.publish() is not None
    assert plane.routes_current and status_document(plane)["routes_current"] is True
    plane.registry.register(instance("onnx-a"))
    doc = status_document(plane)
    assert doc["routes_current"] is False
    acked = dict.fromkeys(("Listener", "Cluster"), doc["snapshot_version"])
    assert not gateway_synced(
        {**doc, "gateways": {"gw": {t: {"acked_version": v} for t, v in acked.items()}}}
    )
    plane.publish()
    assert plane.routes_current


def test_gateway_synced_waits_for_current_routes() -> None:
    types = ("Listener", "Cluster")
    doc = _doc("v2", dict.fromkeys(types, "v2"))
    assert gateway_synced(doc) and gateway_synced({**doc, "routes_current": True})
    assert not gateway_synced({**doc, "routes_current": False})
