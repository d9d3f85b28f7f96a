"""System shared-memory regions registered through the gateway, made again on services that join.

A client registers a region once, at the gateway; the front makes it on every service registered
at that moment (``Front.everywhere``). ``RegionBook`` remembers those regions and which instance
has which, and ``catch_up`` makes the missing ones on each instance that joined
since: the control plane calls it on every registry change before it publishes the change to
Envoy, so a service that joins later (a restart, a new replica) has the regions before the
gateway routes requests to it. Regions registered on a service directly, not through the
gateway, are not the book's business. The book lives in the control plane's memory: after a
restart of the control plane it starts empty (the services keep what they have).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import grpc

from control_plane.model import ServiceInstance
from protos.gen.inference import grpc_service_pb2 as pb

if TYPE_CHECKING:
    from control_plane.front_core import Front

log = logging.getLogger(__name__)

#: REST: /v2/systemsharedmemory/region/<name>/register, .../region/<name>/unregister and
#: /v2/systemsharedmemory/unregister (every region)
_REST_PREFIX = "/v2/systemsharedmemory/"


class RegionBook:
    """The regions registered through the front, and the ones each instance already has."""

    def __init__(self) -> None:
        self._regions: dict[str, pb.SystemSharedMemoryRegisterRequest] = {}
        #: instance id → names of the book's regions made on it
        self._made: dict[str, set[str]] = {}

    def registered(
        self, request: pb.SystemSharedMemoryRegisterRequest, on: Iterable[ServiceInstance]
    ) -> None:
        """A Register that succeeded on every instance in ``on``."""
        kept = pb.SystemSharedMemoryRegisterRequest()
        kept.CopyFrom(request)
        self._regions[request.name] = kept
        for instance in on:
            self._made.setdefault(instance.id, set()).add(request.name)

    def unregistered(self, name: str) -> None:
        """An Unregister of ``name`` (empty: every region) was asked for."""
        names = [name] if name else list(self._regions)
        for gone in names:
            self._regions.pop(gone, None)
            for made in self._made.values():
                made.discard(gone)

    def rest_call(
        self, method: str, path: str, body: bytes, status: int, on: Sequence[ServiceInstance]
    ) -> None:
        """Book a REST shared-memory call the front passed on (``status``: its answer's)."""
        if method != "POST" or not path.startswith(_REST_PREFIX):
            return
        parts = path[len(_REST_PREFIX) :].strip("/").split("/")
        if parts == ["unregister"]:
            self.unregistered("")
        elif len(parts) == 3 and parts[0] == "region" and parts[2] == "unregister":
            self.unregistered(parts[1])
        elif len(parts) == 3 and parts[0] == "region" and parts[2] == "register" and status == 200:
            try:
                doc = json.loads(body or b"{}")
                request = pb.SystemSharedMemoryRegisterRequest(
                    name=parts[1],
                    key=str(doc["key"]),
                    offset=int(doc.get("offset", 0)),
                    byte_size=int(doc["byte_size"]),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                return  # the services accepted it, so this cannot happen; nothing to book
            self.registered(request, on)

    def missing(
        self, instances: Sequence[ServiceInstance]
    ) -> list[tuple[ServiceInstance, pb.SystemSharedMemoryRegisterRequest]]:
        """(instance, region) pairs still to make; instances no longer registered are forgotten."""
        present = {i.id for i in instances}
        for gone in set(self._made) - present:
            del self._made[gone]
        return [
            (instance, request)
            for instance in instances
            for name, request in self._regions.items()
            if name not in self._made.get(instance.id, set())
        ]

    def made(self, instance: ServiceInstance, name: str) -> None:
        """``name`` now exists on ``instance`` (unless it was unregistered meanwhile)."""
        if name in self._regions:
            self._made.setdefault(instance.id, set()).add(name)

    def names(self) -> list[str]:
        return sorted(self._regions)


async def catch_up(front: Front) -> None:
    """Make the book's regions on every registered instance that lacks them, concurrently; an
    instance that refuses one is logged (its requests naming that region will fail) and asked
    again at the next registry change."""
    from control_plane.front_errors import FrontError

    book = front.regions

    async def one(instance: ServiceInstance, request: pb.SystemSharedMemoryRegisterRequest) -> None:
        try:
            await front.call(
                instance,
                "SystemSharedMemoryRegister",
                request,
                pb.SystemSharedMemoryRegisterResponse,
                rpc_timeout=front.fanout_timeout,
            )
        except FrontError as exc:
            if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                log.warning(
                    "shared memory region '%s' (registered through the gateway) could not be "
                    "registered on %s, which joined later: %s",
                    request.name,
                    instance.id,
                    exc.message,
                )
                return
        book.made(instance, request.name)
        log.info(
            "registered shared memory region '%s' on %s, which joined after the region was "
            "registered through the gateway",
            request.name,
            instance.id,
        )

    await asyncio.gather(*(one(i, r) for i, r in book.missing(front.state().instances)))
