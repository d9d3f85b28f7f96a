"""services/core/mesh_caller.py routes in-mesh ModelInfer calls by the gateway's routes, over real
sockets: the control plane's real ADS server serves translate()'s snapshot of two replicas (small
grpc.aio GRPCInferenceService servers on port 0 that answer which replica they are and which
``meshserve-version`` they were sent), and a third such server stands in for the gateway.

Every test runs three times: calls over grpc.aio channels; through a real grpc_front started on
the test's loop (as a service behind the front makes them: front_calls.current_caller()); and
with every server behind its own grpc_front, so that routed calls take the replicas' local links
(local_links.py) while calls to the gateway still go through a front."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from control_plane.model import (
    READY,
    Address,
    MeshState,
    ModelVersion,
    ServiceInstance,
    TrafficPolicy,
)
from control_plane.snapshot import SnapshotCache, make_snapshot
from control_plane.translate import translate
from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from services.core.front_calls import CallFailed, current_caller
from services.core.gateway_client import routing_metadata
from services.core.mesh_caller import MeshCaller
from services.core.native_front import NativeFront, front_binary
from tests.ads_server import serving_ads

WITHIN_S = 10.0


@dataclass
class Replica(pbg.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Answers ModelInfer with its name (``model_name``) and the version header (``id``)."""

    name: str
    unavailable: int = 0  # answer UNAVAILABLE to this many calls first
    timeouts: list[float | None] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)

    async def ModelInfer(  # noqa: N802 (the RPC's name)
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        self.timeouts.append(context.time_remaining())
        self.peers.append(context.peer())
        if self.unavailable:
            self.unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is unloading")
        version = dict(context.invocation_metadata() or ()).get("meshserve-version", "")
        return pb.ModelInferResponse(model_name=self.name, id=str(version))


@dataclass
class Mesh:
    replicas: dict[str, Replica]
    ports: dict[str, int]
    xds: str
    cache: SnapshotCache
    transport: str

    def publish(self, placement: dict[str, tuple[str, ...]], split: dict[str, int]) -> None:
        instances = tuple(
            ServiceInstance(
                name,
                "onnx",
                "127.0.0.1",
                self.ports[name],
                0,
                models=tuple(ModelVersion("simple", v, READY) for v in versions),
            )
            for name, versions in placement.items()
        )
        policies = {"simple": TrafficPolicy("simple", split)} if split else {}
        state = MeshState(instances, policies, front_grpc=Address("127.0.0.1", 1))
        self.cache.set(make_snapshot(translate(state, grpc_port=1, http_port=2)))


@pytest.fixture(params=["aio", "front", "link"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """How calls leave: grpc.aio, a grpc_front running on this loop, or local links to replicas
    behind fronts of their own (both skipped if grpc_front is not built)."""
    if request.param == "aio":
        yield "aio"
        return
    binary = front_binary()
    if binary is None:
        pytest.skip("grpc_front is not built (make native; needs Debian's libgrpc++-dev)")
    if request.param == "link":
        yield "link"
        return
    front = NativeFront(binary, 64 << 20)
    await front.start("127.0.0.1", 0)
    try:
        assert current_caller() is front.caller
        yield "front"
    finally:
        await front.stop(0)


@pytest.fixture
async def mesh(transport: str) -> AsyncIterator[Mesh]:
    servers = []
    replicas = {n: Replica(n) for n in ("a", "b", "gateway")}
    ports = {}
    binary = front_binary()
    for name, replica in replicas.items():
        server: grpc.aio.Server | NativeFront
        if transport == "link" and binary is not None:
            server = NativeFront(binary, 64 << 20)
            pbg.add_GRPCInferenceServiceServicer_to_server(replica, server)  # type: ignore[no-untyped-call]
            servers.append(server)
            ports[name] = await server.start("127.0.0.1", 0)
            continue
        server = grpc.aio.server()
        pbg.add_GRPCInferenceServiceServicer_to_server(replica, server)  # type: ignore[no-untyped-call]
        ports[name] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
    cache = SnapshotCache()
    try:
        async with serving_ads(cache) as (_, ads_port):
            yield Mesh(replicas, ports, f"127.0.0.1:{ads_port}", cache, transport)
    finally:
        for server in servers:
            await server.stop(None)


async def call(
    caller: MeshCaller, version: str = "", model: str = "simple", timeout_s: float | None = None
) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    return await caller.model_infer(request, routing_metadata(model, version), timeout_s)


async def ready_caller(mesh: Mesh) -> MeshCaller:
    caller = MeshCaller(f"127.0.0.1:{mesh.ports['gateway']}", mesh.xds, "test")
    caller.start()
    assert caller.routes_ready is not None
    await asyncio.wait_for(caller.routes_ready.wait(), WITHIN_S)
    return caller


async def test_calls_go_straight_to_the_replicas_of_the_routed_version(mesh: Mesh) -> None:
    mesh.publish({"a": ("1", "2"), "b": ("2",)}, {})
    caller = await ready_caller(mesh)
    try:
        answers = Counter()
        for _ in range(40):
            reply = await call(caller)
            answers[(reply.model_name, reply.id)] += 1
        # version 2 (the default) is on both replicas; the gateway saw nothing
        assert set(answers) == {("a", "2"), ("b", "2")}
        pinned = {(r.model_name, r.id) for r in [await call(caller, "1") for _ in range(5)]}
        assert pinned == {("a", "1")}
        assert not mesh.replicas["gateway"].timeouts
        # replicas behind fronts are called over their local links, the others over gRPC
        peers = {p.split(":")[0] for n in "ab" for p in mesh.replicas[n].peers}
        assert peers == ({"local"} if mesh.transport == "link" else {"ipv4"})
    finally:
        await caller.close()


async def test_a_split_sends_each_version_its_share_and_names_it(mesh: Mesh) -> None:
    mesh.publish({"a": ("1",), "b": ("2",)}, {"1": 25, "2": 75})
    caller = await ready_caller(mesh)
    try:
        answers = Counter()
        for _ in range(400):
            reply = await call(caller)
            answers[(reply.model_name, reply.id)] += 1
        assert set(answers) == {("a", "1"), ("b", "2")}
        assert 50 <= answers[("a", "1")] <= 150  # 100 expected
    finally:
        await caller.close()


async def test_unavailable_is_retried_on_the_other_replica(mesh: Mesh) -> None:
    mesh.publish({"a": ("1",), "b": ("1",)}, {})
    caller = await ready_caller(mesh)
    mesh.replicas["a"].unavailable = mesh.replicas["b"].unavailable = 1
    try:
        # both replicas answer UNAVAILABLE once: the call is retried on the other one, then
        # (both tried) on either: three attempts, within the route's two retries
        reply = await call(caller)
        assert reply.model_name in {"a", "b"}
        assert len(mesh.replicas["a"].timeouts) + len(mesh.replicas["b"].timeouts) == 3
        assert mesh.replicas["a"].timeouts and mesh.replicas["b"].timeouts
        # past the route's retries (2) the status reaches the caller
        mesh.replicas["a"].unavailable = mesh.replicas["b"].unavailable = 5
        with pytest.raises(CallFailed) as failed:
            await call(caller)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert "is unloading" in failed.value.details
    finally:
        await caller.close()


async def test_the_deadline_reaches_the_replica(mesh: Mesh) -> None:
    mesh.publish({"a": ("1",)}, {})
    caller = await ready_caller(mesh)
    try:
        await call(caller, timeout_s=3.0)
        remaining = mesh.replicas["a"].timeouts[-1]
        assert remaining is not None and 2.0 < remaining <= 3.1  # gRPC rounds deadlines up
    finally:
        await caller.close()


async def test_what_the_routes_cannot_route_goes_through_the_gateway(mesh: Mesh) -> None:
    mesh.publish({"a": ("1",)}, {})
    caller = await ready_caller(mesh)
    try:
        reply = await call(caller, model="unknown_model")  # the gateway answers NOT_FOUND
        assert reply.model_name == "gateway"
        assert mesh.replicas["gateway"].peers[-1].startswith("ipv4:")  # never a local link
    finally:
        await caller.close()
    without_watch = MeshCaller(f"127.0.0.1:{mesh.ports['gateway']}", "", "test")
    try:
        assert without_watch.routes_ready is None
        assert (await call(without_watch)).model_name == "gateway"
    finally:
        await without_watch.close()
