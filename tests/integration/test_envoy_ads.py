"""A real Envoy configured by our ADS server, in front of the real ONNX service.

Snapshots are built by hand (``tests.xds_resources``): listener → route → cluster → endpoint.
Envoy must serve tritonclient calls, NACK a config it cannot take (weighted clusters whose weights
are all 0) while traffic keeps flowing on the last good one, then apply the next good change.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from control_plane.ads import AdsServicer
from control_plane.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    Snapshot,
    SnapshotCache,
    make_snapshot,
)
from gateway.launcher import Gateway, GatewayError, find_envoy
from tests import xds_resources as xr
from tests.ads_server import serving_ads
from tests.support import ServerThread


def _envoy_missing() -> str:
    try:
        find_envoy()
    except GatewayError as exc:
        return str(exc)
    return ""


pytestmark = pytest.mark.skipif(
    bool(_envoy_missing()), reason=f"no Envoy binary: {_envoy_missing()}"
)

NODE = "meshserve-gateway"
V1, V2 = "model:simple:1", "model:simple:2"


def requests_to(cluster: str) -> str:
    """Envoy's stat name for a cluster's request count (it writes ':' in names as '_')."""
    return f"cluster.{cluster.replace(':', '_')}.upstream_rq_total"


def free_port() -> int:
    """A port that was free a moment ago (Envoy needs a concrete listener port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ControlPlane:
    cache: SnapshotCache
    servicer: AdsServicer
    port: int


@pytest.fixture
async def control_plane() -> AsyncIterator[ControlPlane]:
    cache = SnapshotCache()
    async with serving_ads(cache) as (servicer, port):
        yield ControlPlane(cache, servicer, port)


async def eventually(check: Callable[[], bool], what: str, within: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        await asyncio.sleep(0.02)


def acked_everywhere(cp: ControlPlane, snapshot: Snapshot) -> Callable[[], bool]:
    def check() -> bool:
        types = cp.servicer.status().get(NODE, {})
        return all(
            t in types and types[t].acked_version == snapshot.version
            for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
        )

    return check


def infer(port: int) -> None:
    """ServerLive and one ModelInfer on "simple" through Envoy's listener, checked."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_live()
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.ones((1, 16), dtype=np.int32)
        inputs = [
            grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
            grpcclient.InferInput("INPUT1", [1, 16], "INT32"),
        ]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    finally:
        client.close()


async def test_envoy_follows_snapshots_and_keeps_serving_through_a_nack(
    control_plane: ControlPlane, onnx_server: ServerThread
) -> None:
    cp = control_plane
    port = free_port()
    upstream = ("127.0.0.1", onnx_server.running.grpc_port if onnx_server.running else 0)
    good = make_snapshot(xr.mesh(port, upstream))
    cp.cache.set(good)
    gateway = Gateway("127.0.0.1", cp.port, admin_port=0)
    try:
        await gateway.start(timeout=30)
        await eventually(acked_everywhere(cp, good), "Envoy ACKs the first snapshot")
        await asyncio.to_thread(infer, port)
        stats = await gateway.stats()
        assert stats[requests_to(V1)] >= 2

        # weights all 0: consistent for us, rejected by Envoy, which keeps its last good routes
        bad = make_snapshot(xr.mesh(port, upstream, clusters=(V1, V2), weights={V1: 0, V2: 0}))
        cp.cache.set(bad)

        def route_nacked() -> bool:
            route = cp.servicer.status()[NODE][ROUTE]
            return route.nacked_version == bad.version and bool(route.error)

        await eventually(route_nacked, "Envoy NACKs the zero-weight route")
        route_status = cp.servicer.status()[NODE][ROUTE]
        assert route_status.acked_version == good.version
        assert (
            cp.servicer.status()[NODE][CLUSTER].acked_version == bad.version
        )  # clusters were fine
        await asyncio.to_thread(infer, port)

        # a good change: all traffic to the second cluster
        switched = make_snapshot(
            xr.mesh(port, upstream, clusters=(V1, V2), weights={V1: 0, V2: 100})
        )
        cp.cache.set(switched)
        await eventually(acked_everywhere(cp, switched), "Envoy ACKs the fixed snapshot")
        before = (await gateway.stats()).get(requests_to(V2), 0)
        await asyncio.to_thread(infer, port)
        stats = await gateway.stats()
        assert stats[requests_to(V2)] >= before + 2
    finally:
        await gateway.stop()
    assert gateway.pid is None


async def test_an_envoy_that_cannot_start_is_reported_with_its_own_words(
    control_plane: ControlPlane,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        gateway = Gateway("127.0.0.1", control_plane.port, admin_port=taken.getsockname()[1])
        with pytest.raises(GatewayError, match="Envoy exited with status") as raised:
            await gateway.start(timeout=30)
    assert "address already in use" in str(raised.value).lower()
    assert gateway.pid is None


async def test_a_gateway_stopped_while_it_starts_fails_the_start_with_envoys_exit(
    control_plane: ControlPlane,
) -> None:
    # With no snapshot served Envoy is not ready for a while; stopping it meanwhile (as a mesh
    # does when another part fails to start) must end the start with a GatewayError.
    gateway = Gateway("127.0.0.1", control_plane.port, admin_port=0)
    start = asyncio.create_task(gateway.start(timeout=30))
    await eventually(lambda: gateway.pid is not None, "Envoy spawned")
    await asyncio.sleep(0.3)  # the readiness probe and the stderr reader are running
    await gateway.stop()
    with pytest.raises(GatewayError, match="Envoy exited with status"):
        await start
    assert gateway.pid is None
