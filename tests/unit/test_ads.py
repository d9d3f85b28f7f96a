"""The SotW ADS server over a real grpc.aio server on 127.0.0.1:0, driven by a real stub acting
as Envoy: responses and nonces, ACK, push on a new snapshot, NACK, stale nonces, name changes.

"Nothing was sent" is shown without sleeping: requests on a stream are handled in order, so a
probe request that must be answered is sent next, and its answer has to be the next message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.ads import AdsServicer, TypeStatus
from control_plane.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SnapshotCache, make_snapshot
from tests import xds_resources as xr
from tests.ads_server import serving_ads

NODE = "test-envoy"
UPSTREAM = ("127.0.0.1", 9001)
TWO = ("model:a:1", "model:a:2")


@dataclass
class Harness:
    cache: SnapshotCache
    servicer: AdsServicer
    stub: Any


@pytest.fixture
async def ads() -> AsyncIterator[Harness]:
    cache = SnapshotCache()
    async with serving_ads(cache) as (servicer, port):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Harness(cache, servicer, ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel))
        finally:
            await channel.close(None)


def request(
    type_url: str, version: str = "", nonce: str = "", names: tuple[str, ...] = (), error: str = ""
) -> Any:
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, version_info=version, response_nonce=nonce, resource_names=list(names)
    )
    req.node.id = NODE
    if error:
        req.error_detail.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        req.error_detail.message = error
    return req


async def read(call: Any) -> Any:
    return await asyncio.wait_for(call.read(), 5)


async def answered(call: Any, req: Any) -> Any:
    await call.write(req)
    return await read(call)


async def probe(call: Any, type_url: str = ROUTE) -> None:
    """Subscribe to a new type: the next message must be that answer (nothing was sent before it).

    It also shows that every request written before it has been handled.
    """
    resp = await answered(call, request(type_url))
    assert resp.type_url == type_url


def snapshot(port: int = 8001, clusters: tuple[str, ...] = TWO) -> Any:
    return make_snapshot(xr.mesh(port, UPSTREAM, clusters=clusters))


async def test_first_request_gets_every_cluster_with_a_nonce(ads: Harness) -> None:
    snap = snapshot()
    ads.cache.set(snap)
    call = ads.stub.StreamAggregatedResources()
    resp = await answered(call, request(CLUSTER))
    assert (resp.type_url, resp.version_info) == (CLUSTER, snap.version)
    assert resp.nonce
    names = []
    for packed in resp.resources:
        cluster = cluster_pb2.Cluster()
        assert packed.Unpack(cluster)
        names.append(cluster.name)
    assert names == sorted(TWO)


async def test_a_request_before_any_snapshot_is_answered_when_one_is_set(ads: Harness) -> None:
    call = ads.stub.StreamAggregatedResources()
    await call.write(request(LISTENER))
    snap = snapshot()
    ads.cache.set(snap)
    resp = await read(call)
    assert (resp.type_url, resp.version_info, len(resp.resources)) == (LISTENER, snap.version, 1)


async def test_ack_gets_no_answer_and_is_recorded(ads: Harness) -> None:
    snap = snapshot()
    ads.cache.set(snap)
    call = ads.stub.StreamAggregatedResources()
    resp = await answered(call, request(CLUSTER))
    await call.write(request(CLUSTER, resp.version_info, resp.nonce))
    await probe(call)
    assert ads.servicer.status()[NODE][CLUSTER] == TypeStatus(acked_version=snap.version)


async def test_a_new_snapshot_is_pushed_in_make_before_break_order(ads: Harness) -> None:
    ads.cache.set(snapshot())
    call = ads.stub.StreamAggregatedResources()
    seen = []
    for type_url in (LISTENER, CLUSTER):
        resp = await answered(call, request(type_url))
        await call.write(request(type_url, resp.version_info, resp.nonce))
        seen.append(resp.nonce)
    newer = snapshot(port=8002)
    ads.cache.set(newer)
    pushed = [await read(call), await read(call)]
    assert [(r.type_url, r.version_info) for r in pushed] == [
        (CLUSTER, newer.version),
        (LISTENER, newer.version),
    ]
    assert len({*seen, *(r.nonce for r in pushed)}) == 4


async def test_nack_is_logged_recorded_and_not_resent_until_a_newer_snapshot(
    ads: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    good = snapshot()
    ads.cache.set(good)
    call = ads.stub.StreamAggregatedResources()
    first = await answered(call, request(CLUSTER))
    await call.write(request(CLUSTER, first.version_info, first.nonce))
    await probe(call, ROUTE)  # the ACK has been handled
    bad = snapshot(port=8002)
    ads.cache.set(bad)
    pushed, route_push = await read(call), await read(call)
    assert (pushed.type_url, pushed.version_info) == (CLUSTER, bad.version)
    assert route_push.type_url == ROUTE
    await call.write(request(CLUSTER, good.version, pushed.nonce, error="weights sum to 0"))
    await probe(call, LISTENER)  # the NACKed version was not sent again
    assert "rejected Cluster version " + bad.version + ": weights sum to 0" in caplog.text
    assert ads.servicer.status()[NODE][CLUSTER] == TypeStatus(
        good.version, bad.version, "weights sum to 0"
    )

    fixed = snapshot(port=8003)
    ads.cache.set(fixed)
    resent = await read(call)
    assert (resent.type_url, resent.version_info) == (CLUSTER, fixed.version)
    assert [(await read(call)).type_url for _ in range(2)] == [LISTENER, ROUTE]
    await call.write(request(CLUSTER, fixed.version, resent.nonce))
    await probe(call, ENDPOINT)
    assert ads.servicer.status()[NODE][CLUSTER].acked_version == fixed.version


async def test_requests_with_a_stale_nonce_are_ignored(ads: Harness) -> None:
    ads.cache.set(snapshot())
    call = ads.stub.StreamAggregatedResources()
    old = await answered(call, request(ENDPOINT, names=TWO[:1]))
    newer = snapshot(port=8002)
    ads.cache.set(newer)
    pushed = await read(call)
    assert pushed.version_info == newer.version
    # an ACK of the old response, and even a name change under its nonce: both stale
    await call.write(request(ENDPOINT, old.version_info, old.nonce))
    await call.write(request(ENDPOINT, old.version_info, old.nonce, names=TWO))
    await probe(call)
    assert ads.servicer.status()[NODE].get(ENDPOINT, TypeStatus()).acked_version == ""


async def test_changed_resource_names_are_answered_under_the_same_version(ads: Harness) -> None:
    snap = snapshot()
    ads.cache.set(snap)
    call = ads.stub.StreamAggregatedResources()
    one = await answered(call, request(ENDPOINT, names=TWO[:1]))
    assert len(one.resources) == 1
    two = await answered(call, request(ENDPOINT, one.version_info, one.nonce, names=TWO))
    assert two.version_info == snap.version
    assert two.nonce != one.nonce
    got = []
    for packed in two.resources:
        assignment = endpoint_pb2.ClusterLoadAssignment()
        packed.Unpack(assignment)
        got.append(assignment.cluster_name)
    assert got == sorted(TWO)


async def test_listeners_and_clusters_always_carry_every_resource(ads: Harness) -> None:
    ads.cache.set(snapshot())
    call = ads.stub.StreamAggregatedResources()
    resp = await answered(call, request(CLUSTER, names=TWO[:1]))
    assert len(resp.resources) == 2
    routes = await answered(call, request(ROUTE))
    assert len(routes.resources) == 1


async def test_delta_ads_is_unimplemented(ads: Harness) -> None:
    call = ads.stub.DeltaAggregatedResources()
    # the refusal may arrive before the write completes: either call raises it
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER))
        await read(call)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "state-of-the-world" in (raised.value.details() or "")


def cluster_names(resp: Any) -> list[str]:
    names = []
    for packed in resp.resources:
        cluster = cluster_pb2.Cluster()
        assert packed.Unpack(cluster)
        names.append(cluster.name)
    return names


async def test_removing_a_cluster_is_make_before_break(ads: Harness) -> None:
    """Routes stop naming a cluster before the cluster goes: clusters (removed one kept), the
    routes, then the final clusters."""
    first = snapshot(clusters=TWO)
    ads.cache.set(first)
    call = ads.stub.StreamAggregatedResources()
    cds = await answered(call, request(CLUSTER))
    await call.write(request(CLUSTER, cds.version_info, cds.nonce))
    rds = await answered(call, request(ROUTE, names=(xr.ROUTE_NAME,)))
    await call.write(request(ROUTE, rds.version_info, rds.nonce, names=(xr.ROUTE_NAME,)))

    second = snapshot(clusters=TWO[:1])
    ads.cache.set(second)
    pushed = []
    while not (
        pushed and pushed[-1].type_url == CLUSTER and pushed[-1].version_info == second.version
    ):
        pushed.append(await read(call))
    routes_moved = [
        i for i, r in enumerate(pushed) if r.type_url == ROUTE and r.version_info == second.version
    ]
    dropped = [
        i for i, r in enumerate(pushed) if r.type_url == CLUSTER and TWO[1] not in cluster_names(r)
    ]
    assert routes_moved and dropped, [(r.type_url, r.version_info) for r in pushed]
    assert routes_moved[0] < dropped[0]  # the cluster left only after the routes stopped naming it
    assert cluster_names(pushed[-1]) == [TWO[0]]
