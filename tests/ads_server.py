"""Test support: the control plane's real ADS server (control_plane/ads.py) on 127.0.0.1 port 0.

``serving_ads(cache)`` serves ``cache``'s snapshots over gRPC for the block and always stops the
server afterwards; it yields the servicer (its ``status()`` shows what each node ACKed) and the
port.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from control_plane.ads import AdsServicer
from control_plane.snapshot import SnapshotCache


@contextlib.asynccontextmanager
async def serving_ads(
    cache: SnapshotCache, port: int = 0
) -> AsyncIterator[tuple[AdsServicer, int]]:
    servicer = AdsServicer(cache)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield servicer, bound
    finally:
        await server.stop(None)
