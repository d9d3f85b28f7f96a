"""ModelInfer calls from inside the mesh (ensemble steps), routed by the gateway's own routes.

A step call is routed exactly as the gateway would route it, by the same routes (the control
plane's ``grpc_routes`` and their endpoints, followed over ADS by route_watch.py and evaluated by
mesh_routes.py): splits pick the version, the call carries the headers the route adds, a replica
is picked by least outstanding requests (two random choices, as Envoy's LEAST_REQUEST), and an
UNAVAILABLE answer is retried on another replica as often as the route's retry policy allows. The
call then goes straight to that replica, which saves the gateway hop (two proxy legs) per step.

A call goes through the gateway instead when this process has no route watch (``MESHSERVE_XDS``
unset: nothing to read the routes from), while the first routes and endpoints have not arrived
(calls wait up to FIRST_ROUTES_WAIT_S for them), or when
the table cannot route it exactly as Envoy would (mesh_routes.py lists the cases: unknown models,
mirrored routes, ...).

The bytes travel over a local link where the replica is a service on this host that offers one
(local_links.py: straight to its event loop, no gRPC front on either side), else over
grpc_front's outbound calls where this service runs behind grpc_front (front_calls.py), else
over grpc.aio channels, one per address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import cast

import grpc

from protos.gen.inference import grpc_service_pb2 as pb
from services.core import local_links
from services.core.front_calls import CallFailed, current_caller
from services.core.gateway_client import CHANNEL_OPTIONS
from services.core.route_watch import RouteWatch

log = logging.getLogger(__name__)

#: environment variable naming the control plane's ADS address (``host:port``); unset: no
#: route watch, every in-mesh call goes through the gateway
XDS_ENV = "MESHSERVE_XDS"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
#: how long calls wait for the first routes before they go through the gateway
FIRST_ROUTES_WAIT_S = 2.0

Metadata = Sequence[tuple[str, str | bytes]]


def xds_address() -> str:
    """The ADS address in-mesh callers read the gateway's routes from ("" when none)."""
    return os.environ.get(XDS_ENV, "").strip()


class Transport:
    """Unary calls: through this loop's grpc_front where one runs (front_calls.py), else over
    grpc.aio channels, one per address (made on first use)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def unary(
        self,
        target: str,
        method: str,
        request: bytes,
        metadata: Metadata,
        timeout_s: float | None,
        local: bool = False,
    ) -> bytes | memoryview:
        """``local``: over a local link where ``target`` offers one (local_links.py)."""
        if local:
            links = local_links.for_loop()
            link = links.ready(target) or await links.connect(target)
            if link is not None:
                return await link.unary(
                    target, method, request, metadata=metadata, timeout=timeout_s
                )
        front = current_caller()
        if front is not None:
            return await front.unary(target, method, request, metadata=metadata, timeout=timeout_s)
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = grpc.aio.insecure_channel(
                target, options=CHANNEL_OPTIONS
            )
        call = channel.unary_unary(method, None, None)  # bytes in, bytes out
        try:
            reply: bytes = await call(request, metadata=tuple(metadata), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(exc.code(), exc.details() or "") from None
        return reply

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(None)


class MeshCaller:
    """ModelInfer to models in the mesh; one per event loop (``for_loop``)."""

    def __init__(self, gateway: str, xds: str, caller: str) -> None:
        self.gateway = gateway
        self._watch = RouteWatch(xds, caller) if xds else None
        self._transport = Transport()
        #: calls in flight per replica address (least-request picking)
        self._outstanding: Counter[str] = Counter()
        self._started = False

    async def model_infer(
        self,
        request: pb.ModelInferRequest,
        metadata: Metadata,
        timeout_s: float | None,
        *,
        via_gateway: bool = False,
    ) -> pb.ModelInferResponse:
        """Send ``request``; its ``metadata`` must carry the routing headers
        (gateway_client.routing_metadata). ``via_gateway``: through the gateway whatever the
        routes say. Raises CallFailed with the call's status."""
        reply = await self._call(request.SerializeToString(), metadata, timeout_s, via_gateway)
        # upb parses any buffer: a long answer stays the front's memoryview, uncopied
        return pb.ModelInferResponse.FromString(cast(bytes, reply))

    def start(self) -> None:
        """Start following the routes (the first call does it too); idempotent."""
        if not self._started:
            self._started = True
            if self._watch is not None:
                self._watch.start()

    @property
    def routes_ready(self) -> asyncio.Event | None:
        """Set once calls can go straight to replicas; None without a route watch."""
        return None if self._watch is None else self._watch.ready

    async def _call(
        self, payload: bytes, metadata: Metadata, timeout_s: float | None, via_gateway: bool
    ) -> bytes | memoryview:
        self.start()
        table = None
        if self._watch is not None and not via_gateway:
            if not self._watch.ready.is_set():
                # the first calls wait a moment for the routes rather than take the long way
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._watch.ready.wait(), FIRST_ROUTES_WAIT_S)
            table = self._watch.table
        routed = None
        if table is not None:
            headers = {k.lower(): v for k, v in metadata if isinstance(v, str)}
            routed = table.route(INFER_METHOD, headers)
        if routed is None:
            return await self._transport.unary(
                self.gateway, INFER_METHOD, payload, metadata, timeout_s
            )
        added = dict(routed.headers)
        sent = [(k, v) for k, v in metadata if k.lower() not in added] + list(added.items())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        tried: set[str] = set()
        for attempt in range(routed.retries + 1):
            target = self._pick(routed.endpoints, tried)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            self._outstanding[target] += 1
            try:
                return await self._transport.unary(
                    target, INFER_METHOD, payload, sent, left, local=True
                )
            except CallFailed as failed:
                if failed.code != grpc.StatusCode.UNAVAILABLE or attempt == routed.retries:
                    raise
                log.info("%s answered UNAVAILABLE (%s); retrying", target, failed.details)
                tried.add(target)
            finally:
                self._outstanding[target] -= 1
                if not self._outstanding[target]:
                    del self._outstanding[target]
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _pick(self, endpoints: Sequence[str], tried: set[str]) -> str:
        """Of two random replicas not tried yet (any when all were), the less busy one."""
        fresh = [e for e in endpoints if e not in tried] or list(endpoints)
        if len(fresh) == 1:
            return fresh[0]
        a, b = random.sample(fresh, 2)
        return a if self._outstanding[a] <= self._outstanding[b] else b

    async def close(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
        await self._transport.close()


#: the service's own event loop (services/core/server.py sets it): calls made on other threads
#: (BLS from a model's worker thread) run there, over the service's grpc_front
_home: asyncio.AbstractEventLoop | None = None


def set_home_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` where ``submit`` runs calls."""
    global _home
    _home = loop


def clear_home_loop(loop: asyncio.AbstractEventLoop) -> None:
    """``loop``'s service stopped: ``submit`` no longer runs calls there."""
    global _home
    if _home is loop:
        _home = None


def submit(
    gateway: str,
    caller: str,
    request: pb.ModelInferRequest,
    metadata: Metadata,
    timeout_s: float | None,
) -> concurrent.futures.Future[pb.ModelInferResponse] | None:
    """Start ``MeshCaller.model_infer`` on the service's loop from any other thread; its future
    (cancelling it cancels the call). None where no service loop runs, or when called on that
    loop's own thread, which would then wait on itself: the caller goes its own way."""
    home = _home
    if home is None or not home.is_running():
        return None
    with contextlib.suppress(RuntimeError):
        if asyncio.get_running_loop() is home:
            return None

    async def call() -> pb.ModelInferResponse:
        return await for_loop(gateway, caller).model_infer(request, metadata, timeout_s)

    return asyncio.run_coroutine_threadsafe(call(), home)


#: one caller per event loop; a closed loop's entry goes with the loop
_callers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, MeshCaller] = (
    weakref.WeakKeyDictionary()
)
#: closes of replaced callers in flight (held so that they run to the end)
_closing: set[asyncio.Task[None]] = set()


def for_loop(gateway: str, caller: str) -> MeshCaller:
    """The running loop's MeshCaller (one route watch per process and loop)."""
    loop = asyncio.get_running_loop()
    found = _callers.get(loop)
    if found is None or found.gateway != gateway:
        if found is not None:  # the gateway moved: stop the old caller's route watch and channels
            task = loop.create_task(found.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)
        found = _callers[loop] = MeshCaller(gateway, xds_address(), caller)
    return found
