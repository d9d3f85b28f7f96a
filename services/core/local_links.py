"""Local links: a service calls another service on this host without either gRPC front.

A call from one service to another (an ensemble step, a BLS call) through the fronts crosses
four processes' worth of threads: the caller's event loop hands the request to its grpc_front,
which sends it over HTTP/2 to the callee's grpc_front, which hands it to the callee's loop, and
the answer goes back the same way. Each hand-off wakes a thread, and on a small machine the
wake-ups, not the bytes, are most of a step's time. A local link is one Unix stream socket from
the caller's loop straight to the callee's loop, speaking the front's own frame protocol
(native/PROTOCOL.md, "Local links"): the caller sends CALL (and CANCEL), the callee runs the
call with the same handlers and answers with FINISH. Routing is unchanged: mesh_caller.py picks
the replica by the gateway's routes first, and only then asks here for a link to it.

Where: a service behind grpc_front (native_front.py) that serves the loopback interface listens
on the abstract Unix socket ``@meshserve-link-<port>``, <port> being its gRPC port. Abstract
sockets belong to the network namespace, as 127.0.0.1 does: a caller that would reach the
service at ``127.0.0.1:<port>`` finds the link by that name, and a service in another container
or pod is never found (its address is not a loopback one). A service that goes away takes its
socket with it; a caller that cannot connect uses the fronts, and tries the link again after
``RETRY_S``.

What stays the same as a gRPC call: the method, the serialized messages, the metadata (tracing
context, routing headers), the deadline (the caller enforces it and cancels the call on the
callee), cancellation, status codes and details. A callee that is stopping answers new calls
UNAVAILABLE (the caller retries them on another replica as the route allows) and lets calls in
flight finish within its grace period. ``MESHSERVE_LOCAL_LINKS=0`` turns links off on both
sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from collections.abc import Callable, Sequence

import grpc

from services.core.call_runner import CallRunner, Lookup
from services.core.front_calls import CallFailed, FrontCaller
from services.core.front_link import (
    CallStart,
    FrameLink,
    OutResult,
    encode_call,
    encode_cancel,
)

log = logging.getLogger(__name__)

#: "0" (or false/no/off) turns local links off: no socket is offered, none is used
ENV = "MESHSERVE_LOCAL_LINKS"
#: seconds before a port whose link could not be reached is tried again
RETRY_S = 5.0
_LOOPBACK = ("localhost", "::1", "[::1]")
_WILDCARD = ("", "0.0.0.0", "::", "[::]")


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def link_address(port: int) -> str:
    """The abstract socket of the service whose gRPC port is ``port``."""
    return f"\0meshserve-link-{port}"


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK or host.startswith("127.")


def local_port(target: str) -> int | None:
    """The port of a ``host:port`` target on the loopback interface (None: not one)."""
    host, _, port = target.rpartition(":")
    if not _is_loopback(host) or not port.isdigit():
        return None
    return int(port)


# ---- the called side ---------------------------------------------------------------------------
class _Peer:
    """One caller's link: its calls run with the service's handlers (front_link.FrameSink)."""

    def __init__(self, server: LinkServer) -> None:
        self._server = server
        self.link = FrameLink(self)
        self.runner = CallRunner(server.lookup, self.link.send)

    def on_call(self, start: CallStart) -> None:
        refusal = self._server.refusal(start)
        if refusal is None:
            self.runner.on_call(start)
        else:
            self.runner.finish(start.call, *refusal)

    def on_message(self, call: int, payload: bytes | memoryview) -> None:
        self.runner.on_message(call, payload)

    def on_half_close(self, call: int) -> None:
        self.runner.on_half_close(call)

    def on_cancel(self, call: int) -> None:
        self.runner.on_cancel(call)

    def on_drained(self) -> None:
        """Not sent on a local link."""

    def on_out_result(self, result: OutResult) -> None:
        """Not sent on a local link."""

    def on_link_lost(self, exc: Exception | None) -> None:
        self.runner.cancel_all()  # the caller is gone: nobody waits for these answers
        self._server.forget(self)


class LinkServer:
    """The local links into one service (``NativeFront.links``)."""

    def __init__(self, lookup: Lookup, max_message_bytes: int) -> None:
        self.lookup = lookup
        self._max_message_bytes = max_message_bytes
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._refusing = False
        #: the socket callers connect to ("" while none is offered)
        self.address = ""

    async def start(self, host: str, port: int) -> None:
        """Offer a link for the gRPC port ``port`` when the front serves loopback on it."""
        if not enabled() or not (_is_loopback(host) or host in _WILDCARD):
            return
        address = link_address(port)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                self._accept, address
            )
        except OSError as exc:  # another process took the name: calls go through the fronts
            log.warning("no local link for port %d (%s): local callers use gRPC", port, exc)
            return
        self.address = address
        log.info("local link open for gRPC port %d", port)

    def _accept(self) -> FrameLink:
        peer = _Peer(self)
        self._peers.add(peer)
        return peer.link

    def forget(self, peer: _Peer) -> None:
        self._peers.discard(peer)

    def refusal(self, start: CallStart) -> tuple[grpc.StatusCode, str] | None:
        """Why a call is answered at once instead of run (None: it runs)."""
        if self._refusing:
            return grpc.StatusCode.UNAVAILABLE, "the server is stopping"
        size = len(start.payload)
        if size > self._max_message_bytes:
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({size} vs. {self._max_message_bytes})",
            )
        return None

    @property
    def in_flight(self) -> int:
        return sum(peer.runner.in_flight for peer in self._peers)

    def refuse_calls(self) -> None:
        """No new link and no new call from now on (calls in flight go on)."""
        self._refusing = True
        if self._server is not None:
            self._server.close()
            self._server = None
            self.address = ""

    async def stop(self, grace: float) -> None:
        """Refuse calls, give those in flight ``grace`` seconds, cancel the rest, close links."""
        self.refuse_calls()
        peers = list(self._peers)
        if any(peer.runner.in_flight for peer in peers):
            with contextlib.suppress(TimeoutError):
                waits = (peer.runner.idle() for peer in peers)
                await asyncio.wait_for(asyncio.gather(*waits), grace)
        for peer in peers:
            peer.runner.stop_all()
        await asyncio.sleep(0)  # the cancelled calls send their CANCELLED answers
        for peer in peers:
            peer.link.close()


# ---- the calling side --------------------------------------------------------------------------
class LinkCaller(FrontCaller):
    """Unary calls over one local link; it enforces the calls' deadlines itself."""

    def __init__(self, port: int, on_lost: Callable[[LinkCaller], None]) -> None:
        super().__init__()
        self.port = port
        self._on_lost = on_lost
        self.link = FrameLink(self)
        self._peer = f"local:{os.getpid()}".encode()

    async def unary(
        self,
        target: str,
        method: str,
        request: bytes | bytearray | memoryview,
        *,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        timeout: float | None = None,  # noqa: ASYNC109 - the call's deadline, sent to the callee
    ) -> bytes | memoryview:
        if timeout is None:
            return await super().unary(target, method, request, metadata=metadata)
        try:
            async with asyncio.timeout(timeout):
                return await super().unary(
                    target, method, request, metadata=metadata, timeout=timeout
                )
        except TimeoutError:
            raise CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None

    def _call_frame(
        self,
        call: int,
        target: str,
        method: str,
        request: bytes | bytearray | memoryview,
        meta: bytes,
        timeout_us: int,
    ) -> bytes:
        return encode_call(call, method.encode(), self._peer, request, meta, timeout_us)

    def _cancel_frame(self, call: int) -> bytes:
        return encode_cancel(call)

    # ---- frames from the callee (front_link.FrameSink) -----------------------------------------
    def on_call(self, start: CallStart) -> None:
        """Not sent to a caller."""

    def on_message(self, call: int, payload: bytes | memoryview) -> None:
        """Streaming answers: not asked for on a local link."""

    def on_half_close(self, call: int) -> None:
        """Not sent to a caller."""

    def on_cancel(self, call: int) -> None:
        """Not sent to a caller."""

    def on_drained(self) -> None:
        """Not sent to a caller."""

    def on_out_result(self, result: OutResult) -> None:
        self.on_result(result)  # a FINISH: the answer to one of our calls

    def on_link_lost(self, exc: Exception | None) -> None:
        self.close(f"the local link to port {self.port} closed ({exc or 'the service went away'})")
        self._on_lost(self)


class LocalLinks:
    """This event loop's links to local services, one per port, made on first use."""

    def __init__(self) -> None:
        self._callers: dict[int, LinkCaller] = {}
        self._connecting: dict[int, asyncio.Future[LinkCaller | None]] = {}
        self._unreachable: dict[int, float] = {}  # port: when to try again

    def ready(self, target: str) -> LinkCaller | None:
        """The open link to ``target`` (None: none open; ``connect`` may make one)."""
        port = local_port(target)
        return None if port is None else self._callers.get(port)

    async def connect(self, target: str) -> LinkCaller | None:
        """A link to ``target``, opened now if it can be (None: call it over gRPC)."""
        port = local_port(target)
        if port is None or not enabled():
            return None
        if port in self._callers:
            return self._callers[port]
        if time.monotonic() < self._unreachable.get(port, 0.0):
            return None
        pending = self._connecting.get(port)
        if pending is None:
            pending = self._connecting[port] = asyncio.ensure_future(self._open(port))
            pending.add_done_callback(lambda _: self._connecting.pop(port, None))
        return await asyncio.shield(pending)

    async def _open(self, port: int) -> LinkCaller | None:
        caller = LinkCaller(port, self._lost)
        try:
            await asyncio.get_running_loop().create_unix_connection(
                lambda: caller.link, link_address(port)
            )
        except OSError as exc:
            log.debug("no local link to port %d (%s): calling it over gRPC", port, exc)
            self._unreachable[port] = time.monotonic() + RETRY_S
            return None
        caller.attach(caller.link.send)
        self._callers[port] = caller
        self._unreachable.pop(port, None)
        log.info("local link to gRPC port %d open", port)
        return caller

    def _lost(self, caller: LinkCaller) -> None:
        if self._callers.get(caller.port) is caller:
            del self._callers[caller.port]

    def close(self) -> None:
        callers, self._callers = self._callers, {}
        for caller in callers.values():
            caller.link.close()


_links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LocalLinks] = (
    weakref.WeakKeyDictionary()
)


def for_loop() -> LocalLinks:
    """The running loop's links (links belong to the loop that opened them)."""
    loop = asyncio.get_running_loop()
    found = _links.get(loop)
    if found is None:
        found = _links[loop] = LocalLinks()
    return found
