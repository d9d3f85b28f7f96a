"""The state-of-the-world ADS server: xDS streams that only read snapshots from the cache.

Data flow: ``SnapshotCache`` (see ``snapshot``) ─▶ one ``StreamAggregatedResources`` stream per
Envoy ─▶ DiscoveryResponses. Per stream and type URL the server remembers what it last sent
(version, nonce) and which names Envoy asked for, and answers

- a request (not stale) when the snapshot's version differs from the one last sent for that type,
  or when the requested names changed (a new cluster's endpoints are asked for under the same
  version);
- a newer snapshot, pushed at once on every type the stream has subscribed to, in Envoy's
  make-before-break order (clusters, endpoints, listeners, routes), without waiting for the ACK
  of an earlier response (whose ACK or NACK is then stale).

A request whose ``response_nonce`` is not the last one sent is stale and ignored. An ACK repeats the
version and nonce last sent; a NACK carries ``error_detail``: it is logged and recorded, and that
version is not sent again for that type (Envoy keeps its last good config) until another version
has been sent after it; the next snapshot is sent as usual.
LDS/CDS responses hold every resource of the type, RDS/EDS/SDS the names asked for (all when none).
Secrets (the gateway's TLS certificate and key) go only to streams from this host
(``is_local_peer``): a stream from elsewhere gets them empty, and the refusal is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import urllib.parse
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.snapshot import (
    CLUSTER,
    PUSH_ORDER,
    ROUTE,
    SECRET,
    WILDCARD_TYPES,
    Snapshot,
    SnapshotCache,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """What one Envoy (node) last did with one resource type."""

    acked_version: str = ""
    nacked_version: str = ""
    error: str = ""


@dataclass(slots=True)
class _TypeState:
    """One stream's bookkeeping for one type URL."""

    names: frozenset[str] = frozenset()
    sent_version: str | None = None
    nonce: str = ""
    nacked_version: str | None = None


class _End:
    """Marks the end of the request stream in a stream's event queue."""


_Event = Any  # a DiscoveryRequest, a Snapshot or an _End
#: version suffix of a cluster set that still holds clusters the routes may name
_KEEP = "+keep"


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer (``ipv4:10.0.0.5:41234``, ``ipv6:[::1]:5000``, ``unix:/run/x``)
    connects from this host: a Unix socket, or an IP address this host could bind."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


class _Stream:
    """The SotW state machine of one ADS stream: events in, responses out, no I/O but the log."""

    def __init__(self, servicer: AdsServicer, peer: str, *, local: bool = True) -> None:
        self._servicer = servicer
        self._peer = peer
        #: whether the stream may have secrets (it comes from this host)
        self._local = local
        self._types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)
        #: the clusters Envoy last received, by name (to keep removed ones until routes moved)
        self._sent_clusters: dict[str, Any] = {}
        self.node_id = ""

    def on_request(self, request: Any, snapshot: Snapshot | None) -> list[Any]:
        if request.HasField("node") and request.node.id and request.node.id != self.node_id:
            self.node_id = request.node.id
            self._servicer.note_node(self.node_id)
            log.info("ADS stream of %s (%s) opened", self.node_id, self._peer)
        type_url: str = request.type_url
        state = self._types.get(type_url)
        if state is None:
            state = self._types[type_url] = _TypeState()
        elif request.response_nonce and request.response_nonce != state.nonce:
            log.debug("ignoring stale %s request (nonce %s)", type_url, request.response_nonce)
            return []
        names = frozenset(request.resource_names)
        names_changed = names != state.names
        state.names = names
        if request.HasField("error_detail"):
            state.nacked_version = state.sent_version
            message = request.error_detail.message
            log.warning(
                "Envoy %s (%s) rejected %s version %s: %s",
                self.node_id or "?",
                self._peer,
                type_url.rsplit(".", 1)[-1],
                state.sent_version,
                message,
            )
            self._servicer.record(self.node_id, type_url, nacked=state.sent_version, error=message)
        elif request.response_nonce and request.version_info == state.sent_version:
            self._servicer.record(self.node_id, type_url, acked=request.version_info)
        if snapshot is None or snapshot.version == state.nacked_version:
            return []
        if snapshot.version != state.sent_version or names_changed:
            return self._respond_all(type_url, state, snapshot)
        return []

    def on_snapshot(self, snapshot: Snapshot) -> list[Any]:
        responses = []
        for type_url in PUSH_ORDER:
            state = self._types.get(type_url)
            if state is None or snapshot.version in (state.sent_version, state.nacked_version):
                continue
            responses.extend(self._respond_all(type_url, state, snapshot))
        return responses

    # -- make before break ------------------------------------------------------------------
    # Envoy applies each response as it arrives. Routes must never name a cluster Envoy does not
    # have: so routes are preceded by the clusters they name, and a cluster leaves only after the
    # routes that no longer name it were sent (until then it is kept in a "+keep" cluster set).

    def _respond_all(self, type_url: str, state: _TypeState, snapshot: Snapshot) -> list[Any]:
        if type_url == CLUSTER:
            return [self._respond_clusters(state, snapshot)]
        if type_url != ROUTE:
            return [self._respond(type_url, state, snapshot)]
        out: list[Any] = []
        cds = self._types.get(CLUSTER)
        new_clusters = not snapshot.names(CLUSTER) <= set(self._sent_clusters)
        stale = cds is not None and snapshot.version not in (cds.sent_version, cds.nacked_version)
        if cds is not None and stale and new_clusters:
            out.append(self._respond_clusters(cds, snapshot))  # new clusters first
        out.append(self._respond(ROUTE, state, snapshot))
        if cds is not None and cds.sent_version == f"{snapshot.version}{_KEEP}":
            out.append(self._respond_clusters(cds, snapshot))  # now the removed ones may go
        return out

    def _respond_clusters(self, state: _TypeState, snapshot: Snapshot) -> Any:
        names = sorted(snapshot.names(CLUSTER))
        packed = dict(zip(names, snapshot.packed_for(CLUSTER), strict=True))
        removed = set(self._sent_clusters) - set(names)
        rds = self._types.get(ROUTE)
        if removed and rds is not None and rds.sent_version != snapshot.version:
            packed.update({n: self._sent_clusters[n] for n in removed})
            self._sent_clusters = packed
            resources = [packed[n] for n in sorted(packed)]
            return self._respond_with(CLUSTER, state, f"{snapshot.version}{_KEEP}", resources)
        self._sent_clusters = packed
        return self._respond_with(CLUSTER, state, snapshot.version, [packed[n] for n in names])

    def _respond(self, type_url: str, state: _TypeState, snapshot: Snapshot) -> Any:
        wanted: Iterable[str] = () if type_url in WILDCARD_TYPES else state.names
        resources = snapshot.packed_for(type_url, wanted)
        if type_url == SECRET and resources and not self._local:
            log.error(
                "not sending TLS secrets %s to %s (%s): secrets go only to a gateway on this "
                "host; run Envoy beside the control plane and point its ADS at loopback",
                sorted(wanted) or "(all)",
                self.node_id or "?",
                self._peer,
            )
            resources = []
        return self._respond_with(type_url, state, snapshot.version, resources)

    def _respond_with(
        self, type_url: str, state: _TypeState, version: str, resources: list[Any]
    ) -> Any:
        if version != state.nacked_version:
            state.nacked_version = None  # only the version last rejected is held back
        state.sent_version = version
        state.nonce = str(next(self._nonces))
        return discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=state.nonce, resources=resources
        )


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves ``cache``'s snapshots to every Envoy; only SotW (Delta answers UNIMPLEMENTED).

    Use from one asyncio event loop (the grpc.aio server's, the cache's). Each stream owns two
    tasks (request reader, snapshot watcher), cancelled and awaited when the stream ends.
    """

    def __init__(self, cache: SnapshotCache) -> None:
        self._cache = cache
        self._status: dict[str, dict[str, TypeStatus]] = {}

    def status(self) -> dict[str, dict[str, TypeStatus]]:
        """Per node id, per type URL: the last ACKed and NACKed versions and the NACK's error."""
        return {node: dict(types) for node, types in self._status.items()}

    def note_node(self, node_id: str) -> None:
        """Make ``node_id`` appear in ``status`` from its first request on."""
        self._status.setdefault(node_id, {})

    def record(
        self,
        node_id: str,
        type_url: str,
        *,
        acked: str | None = None,
        nacked: str | None = None,
        error: str = "",
    ) -> None:
        """Note an ACK (``acked``) or a NACK (``nacked`` + ``error``) from ``node_id``'s stream."""
        types = self._status.setdefault(node_id, {})
        old = types.get(type_url, TypeStatus())
        if acked is not None:
            types[type_url] = TypeStatus(acked, old.nacked_version, old.error)
        else:
            types[type_url] = TypeStatus(old.acked_version, nacked or "", error)

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        stream = _Stream(self, context.peer(), local=is_local_peer(context.peer()))
        events: asyncio.Queue[_Event] = asyncio.Queue()
        tasks = [
            asyncio.create_task(_read_requests(request_iterator, events), name="ads-reader"),
            asyncio.create_task(_watch_cache(self._cache, events), name="ads-watcher"),
        ]
        try:
            while True:
                event = await events.get()
                if isinstance(event, _End):
                    return
                if isinstance(event, Snapshot):
                    responses = stream.on_snapshot(event)
                else:
                    responses = stream.on_request(event, self._cache.current)
                for response in responses:
                    await context.write(response)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            log.info("ADS stream of %s (%s) ended", stream.node_id or "?", context.peer())

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "meshserve's control plane serves state-of-the-world ADS only; "
            "do not set ads_config.api_type DELTA_GRPC",
        )


async def _read_requests(requests: AsyncIterator[Any], events: asyncio.Queue[_Event]) -> None:
    """Move requests into the stream's queue; an _End follows the last one (or a broken stream)."""
    try:
        async for request in requests:
            events.put_nowait(request)
    except Exception as exc:  # a broken stream ends it like a closed one
        log.info("ADS request stream broke: %r", exc)
    finally:
        events.put_nowait(_End())


async def _watch_cache(cache: SnapshotCache, events: asyncio.Queue[_Event]) -> None:
    """Put every snapshot the cache publishes into the stream's queue."""
    version: str | None = None
    while True:
        snapshot = await cache.wait_newer(version)
        version = snapshot.version
        events.put_nowait(snapshot)
