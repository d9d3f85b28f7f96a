"""Snapshots: content-hash versions stable across builds and processes, consistency errors, cache."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from control_plane.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    InconsistentSnapshot,
    SnapshotCache,
    check_consistency,
    make_snapshot,
)
from tests import xds_resources as xr

UPSTREAM = ("127.0.0.1", 9001)


def labelled_mesh(keys: list[str]) -> xr.Resources:
    """A mesh whose cluster carries map-valued metadata, its keys inserted in ``keys`` order."""
    resources = xr.mesh(
        8001,
        UPSTREAM,
        clusters=("model:a:1", "model:a:2"),
        weights={"model:a:1": 9, "model:a:2": 1},
    )
    labels = struct_pb2.Struct()
    for key in keys:
        labels.fields[key].string_value = f"value-{key}"
    resources.clusters[0].metadata.filter_metadata["meshserve"].CopyFrom(labels)
    return resources


def test_equal_resources_built_twice_have_equal_versions() -> None:
    keys = [f"k{i}" for i in range(20)]
    first = make_snapshot(labelled_mesh(keys))
    second = make_snapshot(labelled_mesh(list(reversed(keys))))
    assert first.version == second.version
    assert first.names(CLUSTER) == {"model:a:1", "model:a:2"}
    assert first.names(ENDPOINT) == {"model:a:1", "model:a:2"}
    assert first.names(LISTENER) == {"grpc"}
    assert first.names(ROUTE) == {"grpc"}


def test_resource_order_does_not_change_the_version() -> None:
    resources = labelled_mesh(["x", "y"])
    before = make_snapshot(resources).version
    resources.clusters.reverse()
    resources.endpoints.reverse()
    assert make_snapshot(resources).version == before


def test_any_change_changes_the_version() -> None:
    base = make_snapshot(xr.mesh(8001, UPSTREAM)).version
    assert make_snapshot(xr.mesh(8002, UPSTREAM)).version != base
    assert make_snapshot(xr.mesh(8001, ("127.0.0.1", 9002))).version != base


def test_version_is_stable_across_processes(tmp_path: Path) -> None:
    script = (
        "from control_plane.snapshot import make_snapshot\n"
        "from tests.unit.test_snapshot import labelled_mesh\n"
        "print(make_snapshot(labelled_mesh([f'k{i}' for i in range(20)])).version)\n"
    )
    root = Path(__file__).resolve().parents[2]
    versions = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        versions.add(done.stdout.strip())
    assert versions == {make_snapshot(labelled_mesh([f"k{i}" for i in range(20)])).version}


def test_packed_for_filters_by_name_and_sorts() -> None:
    snapshot = make_snapshot(xr.mesh(8001, UPSTREAM, clusters=("b", "a")))
    assert [p.type_url for p in snapshot.packed_for(CLUSTER)] == [CLUSTER, CLUSTER]
    only_b = snapshot.packed_for(ENDPOINT, ["b", "missing"])
    assert len(only_b) == 1
    assert only_b[0].value == snapshot.packed[ENDPOINT]["b"].value


def test_duplicate_names_and_wrong_types_are_refused() -> None:
    resources = xr.mesh(8001, UPSTREAM)
    resources.clusters.append(xr.cluster("model:simple:1"))
    with pytest.raises(InconsistentSnapshot, match="two Clusters named 'model:simple:1'"):
        make_snapshot(resources)
    resources = xr.mesh(8001, UPSTREAM)
    resources.routes.append(xr.cluster("oops"))
    with pytest.raises(
        InconsistentSnapshot, match=r"envoy\.config\.cluster\.v3\.Cluster was given"
    ):
        make_snapshot(resources)


def test_consistent_mesh_passes() -> None:
    check_consistency(make_snapshot(labelled_mesh(["a"])))


def test_eds_cluster_without_endpoints_is_inconsistent() -> None:
    resources = xr.mesh(8001, UPSTREAM)
    resources.endpoints.clear()
    with pytest.raises(
        InconsistentSnapshot, match="EDS cluster 'model:simple:1' has no ClusterLoadAssignment"
    ):
        check_consistency(make_snapshot(resources))


def test_eds_service_name_is_the_assignment_asked_for() -> None:
    resources = xr.mesh(8001, UPSTREAM)
    resources.clusters[0].eds_cluster_config.service_name = "elsewhere"
    with pytest.raises(InconsistentSnapshot, match="no ClusterLoadAssignment 'elsewhere'"):
        check_consistency(make_snapshot(resources))
    resources.endpoints[0].cluster_name = "elsewhere"
    check_consistency(make_snapshot(resources))


def test_listener_rds_name_without_route_configuration_is_inconsistent() -> None:
    resources = xr.mesh(8001, UPSTREAM)
    resources.listeners = [xr.listener(8001, route_name="other")]
    with pytest.raises(
        InconsistentSnapshot, match="listener 'grpc' asks for RouteConfiguration 'other'"
    ):
        check_consistency(make_snapshot(resources))


def test_route_to_a_missing_cluster_is_inconsistent() -> None:
    resources = xr.mesh(8001, UPSTREAM)
    resources.routes = [xr.route_config(xr.route_action("model:gone:1"))]
    with pytest.raises(InconsistentSnapshot, match="points to cluster 'model:gone:1'"):
        check_consistency(make_snapshot(resources))


def test_weighted_route_to_a_missing_cluster_is_inconsistent() -> None:
    resources = xr.mesh(8001, UPSTREAM, clusters=("model:a:1",))
    resources.routes = [
        xr.route_config(xr.route_action(weights={"model:a:1": 90, "model:a:2": 10}))
    ]
    with pytest.raises(InconsistentSnapshot, match="points to cluster 'model:a:2'") as raised:
        check_consistency(make_snapshot(resources))
    assert "model:a:1" not in str(raised.value)


async def test_cache_refuses_inconsistent_snapshots_and_keeps_the_current_one() -> None:
    cache = SnapshotCache()
    assert cache.current is None
    good = make_snapshot(xr.mesh(8001, UPSTREAM))
    assert cache.set(good)
    assert not cache.set(make_snapshot(xr.mesh(8001, UPSTREAM)))  # same version: no change
    broken = xr.mesh(8002, UPSTREAM)
    broken.endpoints.clear()
    with pytest.raises(InconsistentSnapshot):
        cache.set(make_snapshot(broken))
    assert cache.current is good


async def test_wait_newer_wakes_on_a_different_version_only() -> None:
    cache = SnapshotCache()
    first = make_snapshot(xr.mesh(8001, UPSTREAM))
    waiter = asyncio.create_task(cache.wait_newer(None))
    await asyncio.sleep(0)
    assert not waiter.done()
    cache.set(first)
    assert await waiter is first
    assert await cache.wait_newer("some other version") is first

    waiter = asyncio.create_task(cache.wait_newer(first.version))
    await asyncio.sleep(0)
    cache.set(make_snapshot(xr.mesh(8001, UPSTREAM)))  # equal content, equal version
    await asyncio.sleep(0)
    assert not waiter.done()
    second = make_snapshot(xr.mesh(8002, UPSTREAM))
    cache.set(second)
    assert await asyncio.wait_for(waiter, 5) is second
