"""A small state-of-the-world ADS client that keeps the gateway's gRPC routes and endpoints current.

Data flow: the control plane's ADS (control_plane/ads.py, the stream Envoy uses) ─▶ one
``StreamAggregatedResources`` stream of this process ─▶ the latest ``grpc_routes``
RouteConfiguration (RDS) and the ClusterLoadAssignments (EDS) of every cluster it names ─▶ a
``RouteTable`` (mesh_routes.py) that callers read. Every response is ACKed with its version and
nonce and the names this client wants; when new routes name new clusters, the next EDS request
asks for them. A broken stream is opened again after a pause, and meanwhile the last table keeps
routing (as Envoy keeps its last config).

The node id says what this client is (``meshserve-caller/<what>/<pid>@<host>``), so the control
plane lists it apart from gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from services.core.mesh_routes import RouteTable, endpoints_of

log = logging.getLogger(__name__)

ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
#: the RDS resource of the gateway's gRPC listener (control_plane/routes.py GRPC_ROUTES)
GRPC_ROUTES = "grpc_routes"
#: node ids of in-mesh callers start with this (the control plane tells them from gateways)
CALLER_NODE_PREFIX = "meshserve-caller/"
#: pause before the stream is opened again after it broke
RETRY_PAUSE_S = (0.2, 5.0)


class RouteWatch:
    """Follows ``grpc_routes`` and its clusters' endpoints on the ADS at ``address``."""

    def __init__(self, address: str, caller: str) -> None:
        self.address = address
        self.node_id = f"{CALLER_NODE_PREFIX}{caller}/{os.getpid()}@{socket.gethostname()}"
        #: the current table, None until the first routes and their endpoints arrived
        self.table: RouteTable | None = None
        #: set once ``table`` is first set
        self.ready = asyncio.Event()
        self._routes: route_pb2.RouteConfiguration | None = None
        self._endpoints: dict[str, tuple[str, ...]] = {}
        self._wanted: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="route-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        pause = RETRY_PAUSE_S[0]
        while True:
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    await self._stream(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken stream: keep the last table, open it again
                log.info("routes from %s: ADS stream broke (%s); retrying", self.address, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_PAUSE_S[1])

    async def _stream(self, channel: grpc.aio.Channel) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        out: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        node = base_pb2.Node(id=self.node_id, cluster="meshserve-callers")
        out.put_nowait(
            discovery_pb2.DiscoveryRequest(
                node=node, type_url=ROUTE_TYPE, resource_names=[GRPC_ROUTES]
            )
        )
        eds_state = ("", "")  # (version, nonce) of the last EDS response
        if self._wanted:  # a reopened stream asks for what it had at once
            out.put_nowait(self._eds_request(*eds_state))

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while True:
                yield await out.get()

        call = stub.StreamAggregatedResources(requests())
        async for response in call:
            if response.type_url == ROUTE_TYPE:
                self._on_routes(response)
                out.put_nowait(
                    discovery_pb2.DiscoveryRequest(
                        type_url=ROUTE_TYPE,
                        version_info=response.version_info,
                        response_nonce=response.nonce,
                        resource_names=[GRPC_ROUTES],
                    )
                )
                if self._routes is not None:
                    wanted = sorted(RouteTable(self._routes, {}).clusters())
                    if wanted != self._wanted:
                        self._wanted = wanted
                        # clusters the routes no longer name are forgotten (SotW: asked no more)
                        self._endpoints = {k: v for k, v in self._endpoints.items() if k in wanted}
                        out.put_nowait(self._eds_request(*eds_state))
            elif response.type_url == ENDPOINT_TYPE:
                self._on_endpoints(response)
                eds_state = (response.version_info, response.nonce)
                out.put_nowait(self._eds_request(*eds_state))
            self._publish()

    def _eds_request(self, version: str, nonce: str) -> discovery_pb2.DiscoveryRequest:
        return discovery_pb2.DiscoveryRequest(
            type_url=ENDPOINT_TYPE,
            version_info=version,
            response_nonce=nonce,
            resource_names=self._wanted,
        )

    def _on_routes(self, response: discovery_pb2.DiscoveryResponse) -> None:
        for resource in response.resources:
            config = route_pb2.RouteConfiguration()
            if resource.Unpack(config) and config.name == GRPC_ROUTES:
                self._routes = config

    def _on_endpoints(self, response: discovery_pb2.DiscoveryResponse) -> None:
        # SotW for EDS: a response holds the assignments asked for; one left out keeps its last
        for resource in response.resources:
            assignment = endpoint_pb2.ClusterLoadAssignment()
            if resource.Unpack(assignment):
                self._endpoints[assignment.cluster_name] = endpoints_of(assignment)

    def _publish(self) -> None:
        if self._routes is None:
            return
        known = {name: self._endpoints.get(name, ()) for name in self._wanted}
        self.table = RouteTable(self._routes, known)
        # ready with the first endpoints (the front's static cluster never has any over EDS)
        if not self.ready.is_set() and self._endpoints:
            log.info(
                "routes from %s: %d clusters; in-mesh calls go straight to the model services",
                self.address,
                len(self._wanted),
            )
            self.ready.set()
