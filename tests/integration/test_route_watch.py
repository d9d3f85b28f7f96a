"""services/core/route_watch.py follows the control plane's real ADS server (control_plane/ads.py
serving snapshots of control_plane/translate.py, as it does for Envoy) over a real gRPC stream:
the first table, a new model version whose cluster it then asks endpoints for, a split, a replica
leaving, and the ACKs the server records for this caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from control_plane.ads import AdsServicer
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
from services.core.mesh_routes import Routed
from services.core.route_watch import CALLER_NODE_PREFIX, ENDPOINT_TYPE, ROUTE_TYPE, RouteWatch
from tests.ads_server import serving_ads

INFER = "/inference.GRPCInferenceService/ModelInfer"
WITHIN_S = 10.0


@dataclass
class Plane:
    cache: SnapshotCache
    servicer: AdsServicer
    address: str

    def publish(self, state: MeshState) -> None:
        self.cache.set(make_snapshot(translate(state, grpc_port=1, http_port=2)))


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    cache = SnapshotCache()
    async with serving_ads(cache) as (servicer, port):
        yield Plane(cache, servicer, f"127.0.0.1:{port}")


def replica(ident: str, port: int, *versions: str) -> ServiceInstance:
    models = tuple(ModelVersion("simple", v, READY) for v in versions)
    return ServiceInstance(ident, "onnx", "127.0.0.1", port, 0, models=models)


FRONT = Address("127.0.0.1", 7000)


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WITHIN_S
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def routed(watch: RouteWatch, version: str = "", rand: float = 0.5) -> Routed | None:
    headers = {"meshserve-model": "simple"}
    if version:
        headers["meshserve-version"] = version
    return None if watch.table is None else watch.table.route(INFER, headers, lambda: rand)


async def test_the_watch_follows_routes_and_endpoints_and_acks(plane: Plane) -> None:
    plane.publish(MeshState((replica("a", 9001, "1"),), front_grpc=FRONT))
    watch = RouteWatch(plane.address, "test")
    watch.start()
    try:
        await asyncio.wait_for(watch.ready.wait(), WITHIN_S)
        first = routed(watch)
        assert first is not None and first.endpoints == ("127.0.0.1:9001",)

        # version 2 appears on a second replica: a new cluster, whose endpoints the watch asks for
        plane.publish(
            MeshState((replica("a", 9001, "1"), replica("b", 9002, "2")), front_grpc=FRONT)
        )
        await until(
            lambda: (r := routed(watch)) is not None and r.cluster == "model:simple:2", "v2"
        )
        now = routed(watch)
        assert now is not None and now.endpoints == ("127.0.0.1:9002",)
        pinned = routed(watch, "1")
        assert pinned is not None and pinned.endpoints == ("127.0.0.1:9001",)

        # a 50/50 split: the table picks by weight, as the gateway does
        split = {"simple": TrafficPolicy("simple", {"1": 50, "2": 50})}
        plane.publish(
            MeshState((replica("a", 9001, "1"), replica("b", 9002, "2")), split, front_grpc=FRONT)
        )
        await until(
            lambda: (r := routed(watch, rand=0.1)) is not None and r.cluster.endswith(":1"), "split"
        )
        high = routed(watch, rand=0.9)
        assert high is not None and dict(high.headers) == {"meshserve-version": "2"}

        # the replica of version 1 leaves: its calls are left to the gateway (no endpoints)
        plane.publish(MeshState((replica("b", 9002, "2"),), front_grpc=FRONT))
        await until(lambda: routed(watch, "1") is None, "version 1 gone")

        node = next(n for n in plane.servicer.status() if n.startswith(CALLER_NODE_PREFIX))
        version = plane.cache.current.version if plane.cache.current else ""
        await until(
            lambda: (
                {t: s.acked_version for t, s in plane.servicer.status()[node].items()}
                == {ROUTE_TYPE: version, ENDPOINT_TYPE: version}
            ),
            "ACKs of the last snapshot",
        )
    finally:
        await watch.stop()


async def test_the_watch_reconnects_and_keeps_its_table_meanwhile() -> None:
    cache = SnapshotCache()
    state = MeshState((replica("a", 9001, "1"),), front_grpc=FRONT)
    cache.set(make_snapshot(translate(state, grpc_port=1, http_port=2)))
    async with serving_ads(cache) as (_, port):
        watch = RouteWatch(f"127.0.0.1:{port}", "test")
        watch.start()
        await asyncio.wait_for(watch.ready.wait(), WITHIN_S)
    try:
        await asyncio.sleep(0.3)  # the server is gone: the stream broke
        assert routed(watch) is not None  # the last table still routes
        async with serving_ads(cache, port) as (fresh, _):
            await until(
                lambda: any(n.startswith(CALLER_NODE_PREFIX) for n in fresh.status()),
                "the watch's new stream",
            )
    finally:
        await watch.stop()
