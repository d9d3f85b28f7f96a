"""The Consul source and the Consul registrar, against a STAND-IN of Consul's HTTP API.

No Consul server can be installed on these machines, so ``ConsulStandIn`` below is an aiohttp app
written from Consul's published HTTP API documentation (``/v1/health/service/<name>`` with
``X-Consul-Index`` and blocking queries — ``index`` + ``wait`` hold the request until the index
changes (moves on, or goes back as after a snapshot restore) or the wait runs out — ``?passing``, and the agent's
``/v1/agent/service/register`` and ``/v1/agent/service/deregister/<id>``). It is NOT Consul: it
checks nothing of a real agent's behaviour beyond what those documents say; health-check results
are set by the test (a real agent would run the gRPC check itself).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from control_plane.consul import ConsulSource, instance_from_entry, next_index
from control_plane.model import ModelVersion
from services.core.registration import (
    ConsulRegistrar,
    ModelStatus,
    ServiceIdentity,
    consul_registration_payload,
)

# py-consul 1.8's asyncio client builds its aiohttp connector with a deprecated argument
pytestmark = pytest.mark.filterwarnings("ignore:verify_ssl is deprecated:DeprecationWarning")


def _seconds(wait: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", wait)
    assert m, f"bad wait {wait!r}"
    return float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m[2]]


class ConsulStandIn:
    """Consul's documented HTTP API, as far as the tests need it (not Consul)."""

    def __init__(self) -> None:
        self.index = 10
        self.services: dict[str, dict[str, Any]] = {}
        self.check_status: dict[str, str] = {}
        self.queries: list[dict[str, str]] = []
        self.held = asyncio.Event()  # set while a blocking query is waiting
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/health/service/{name}", self._health)
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self._deregister)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        await self.change(lambda: None, index=self.index + 1)  # release held queries
        assert self._runner is not None
        await self._runner.cleanup()

    async def change(self, mutate: Any, index: int | None = None) -> None:
        async with self._changed:
            mutate()
            self.index = self.index + 1 if index is None else index
            self._changed.notify_all()

    async def set_check(self, service_id: str, status: str) -> None:
        await self.change(lambda: self.check_status.__setitem__(service_id, status))

    def _entries(self, name: str, passing: bool) -> list[dict[str, Any]]:
        out = []
        for sid, svc in sorted(self.services.items()):
            status = self.check_status.get(sid, "critical")
            if svc["Name"] != name or (passing and status != "passing"):
                continue
            out.append(
                {
                    "Node": {"Node": "stand-in", "Address": "127.0.0.1"},
                    "Service": {
                        "ID": sid,
                        "Service": svc["Name"],
                        "Tags": svc.get("Tags", []),
                        "Address": svc.get("Address", ""),
                        "Port": svc.get("Port", 0),
                        "Meta": svc.get("Meta", {}),
                    },
                    "Checks": [
                        {"CheckID": "serfHealth", "Status": "passing"},
                        {"CheckID": svc["Check"]["CheckID"], "Status": status},
                    ],
                }
            )
        return out

    async def _health(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.queries.append(q)
        asked = int(q.get("index", "0"))
        if asked:
            wait = _seconds(q.get("wait", "5m"))
            async with self._changed:
                self.held.set()
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self.index != asked), wait
                    )
                except TimeoutError:
                    pass
                finally:
                    self.held.clear()
        entries = self._entries(request.match_info["name"], "passing" in q)
        return web.json_response(entries, headers={"X-Consul-Index": str(self.index)})

    async def _register(self, request: web.Request) -> web.Response:
        body = await request.json()
        await self.change(lambda: self.services.__setitem__(body["ID"], body))
        return web.Response()

    async def _deregister(self, request: web.Request) -> web.Response:
        await self.change(lambda: self.services.pop(request.match_info["id"], None))
        return web.Response()


@pytest.fixture
async def consul() -> AsyncIterator[ConsulStandIn]:
    standin = ConsulStandIn()
    await standin.start()
    yield standin
    await standin.close()


@pytest.fixture
async def source(consul: ConsulStandIn) -> AsyncIterator[ConsulSource]:
    src = ConsulSource(consul.url, wait_s=30)
    yield src
    await src.close()


IDENTITY = ServiceIdentity("onnx-h-1", "onnx", "127.0.0.1", 9001, 9000, 9002)
MODELS = [
    ModelStatus("simple", "1", "READY", platform="onnxruntime_onnx"),
    ModelStatus("broken", "", "UNAVAILABLE", reason="no version folder"),
]


async def register(consul: ConsulStandIn, identity: ServiceIdentity = IDENTITY) -> None:
    """What ConsulRegistrar sends, sent once (the registration outlives this helper)."""
    payload = consul_registration_payload(identity, MODELS)
    async with (
        aiohttp.ClientSession() as http,
        http.put(f"http://{consul.url}/v1/agent/service/register", json=payload) as resp,
    ):
        assert resp.status == 200


async def test_initial_list_carries_family_ports_and_models(
    consul: ConsulStandIn, source: ConsulSource
) -> None:
    await register(consul)
    await consul.set_check("onnx-h-1", "passing")
    assert await source.poll_once() is True
    (inst,) = source.instances()
    assert (inst.id, inst.family, inst.host) == ("onnx-h-1", "onnx", "127.0.0.1")
    assert (inst.grpc_port, inst.http_port, inst.metrics_port) == (9001, 9000, 9002)
    assert inst.ready_versions() == [ModelVersion("simple", "1", "READY", "", "onnxruntime_onnx")]
    assert ModelVersion("broken", "", "UNAVAILABLE", "no version folder") in inst.models
    assert source.version == 1 and source.index == consul.index
    assert "index" not in consul.queries[0] and "passing" in consul.queries[0]


async def test_a_change_wakes_a_blocking_query(consul: ConsulStandIn, source: ConsulSource) -> None:
    await register(consul)  # its check is still critical
    await source.poll_once()
    assert source.instances() == ()
    poll = asyncio.create_task(source.poll_once())
    await asyncio.wait_for(consul.held.wait(), 10)
    assert consul.queries[-1]["index"] == str(consul.index)
    await consul.set_check("onnx-h-1", "passing")
    assert await asyncio.wait_for(poll, 10) is True
    assert [i.id for i in source.instances()] == ["onnx-h-1"]


async def test_a_blocking_query_that_returns_unchanged_does_not_bump(
    consul: ConsulStandIn, source: ConsulSource
) -> None:
    await source.poll_once()
    v = source.version
    poll = asyncio.create_task(source.poll_once())
    await asyncio.wait_for(consul.held.wait(), 10)
    await consul.change(lambda: None)  # an index bump that changes nothing for us
    assert await asyncio.wait_for(poll, 10) is False
    assert source.version == v


async def test_index_going_backwards_restarts_the_loop(
    consul: ConsulStandIn, source: ConsulSource
) -> None:
    await register(consul)  # its check is still critical
    await source.poll_once()
    assert source.index == 11
    poll = asyncio.create_task(source.poll_once())
    await asyncio.wait_for(consul.held.wait(), 10)
    # e.g. a snapshot restore: the index goes back, and the data changed with it
    await consul.change(lambda: consul.check_status.__setitem__("onnx-h-1", "passing"), index=3)
    assert await asyncio.wait_for(poll, 10) is True
    assert source.index == 0  # reset: the next query does not block
    await source.poll_once()
    assert "index" not in consul.queries[-1]
    assert source.index == 3
    # blocking again from the new index, and a later change is seen
    poll = asyncio.create_task(source.poll_once())
    await asyncio.wait_for(consul.held.wait(), 10)
    assert consul.queries[-1]["index"] == "3"
    await consul.set_check("onnx-h-1", "critical")
    assert await asyncio.wait_for(poll, 10) is True
    assert source.instances() == ()


async def test_index_not_above_zero_is_treated_as_one(
    consul: ConsulStandIn, source: ConsulSource
) -> None:
    await consul.change(lambda: None, index=0)
    await source.poll_once()
    assert source.index == 1
    assert next_index(0, 0) == 1 and next_index(5, -1) == 0 and next_index(5, 7) == 7


async def test_only_instances_with_passing_checks_count(
    consul: ConsulStandIn, source: ConsulSource
) -> None:
    await register(consul)
    await register(consul, ServiceIdentity("onnx-h-2", "onnx", "127.0.0.2", 9101))
    await consul.set_check("onnx-h-2", "passing")
    await source.poll_once()
    assert [i.id for i in source.instances()] == ["onnx-h-2"]  # onnx-h-1 is still critical
    await consul.set_check("onnx-h-1", "passing")
    await consul.set_check("onnx-h-2", "warning")
    await source.poll_once()
    assert [i.id for i in source.instances()] == ["onnx-h-1"]


async def test_watch_task_and_registrar_close_deregisters(
    consul: ConsulStandIn, source: ConsulSource
) -> None:
    registrar = ConsulRegistrar(consul.url, IDENTITY, lambda: MODELS)
    await registrar.start()
    await consul.set_check("onnx-h-1", "passing")
    source.start()
    await asyncio.wait_for(source.wait_changed(0), 10)
    assert [i.id for i in source.instances()] == ["onnx-h-1"]
    v = source.version
    await registrar.close()
    assert consul.services == {}
    await asyncio.wait_for(source.wait_changed(v), 10)
    assert source.instances() == ()


def test_registration_payload_fields() -> None:
    p = consul_registration_payload(IDENTITY, MODELS, check_interval_s=2, deregister_after_s=90)
    assert (p["ID"], p["Name"], p["Address"], p["Port"]) == (
        "onnx-h-1",
        "meshserve",
        "127.0.0.1",
        9001,
    )
    assert p["Tags"] == ["family=onnx"]
    check = p["Check"]
    assert check["GRPC"] == "127.0.0.1:9001"
    assert check["GRPCUseTLS"] is False
    assert check["Interval"] == "2000ms"
    assert check["DeregisterCriticalServiceAfter"] == "90000ms"
    meta = p["Meta"]
    assert meta["meshserve-family"] == "onnx"
    assert (meta["meshserve-grpc-port"], meta["meshserve-http-port"]) == ("9001", "9000")
    assert all(len(v) <= 512 for v in meta.values()) and len(meta) <= 64
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,128}", k) for k in meta)


def test_many_models_are_chunked_within_consul_meta_limits() -> None:
    models = [ModelStatus(f"model_{n}", "1", "READY", "r" * 40) for n in range(150)]
    p = consul_registration_payload(IDENTITY, models)
    meta = p["Meta"]
    assert int(meta["meshserve-models-chunks"]) > 1
    assert all(len(v) <= 512 for v in meta.values()) and len(meta) <= 64
    entry = {"Service": {"ID": p["ID"], "Address": p["Address"], "Port": p["Port"], "Meta": meta}}
    inst = instance_from_entry(entry)
    assert len(inst.models) == 150
    with pytest.raises(ValueError, match="embedded registry"):
        consul_registration_payload(IDENTITY, models * 20)
