"""Local links (services/core/local_links.py, native/PROTOCOL.md "Local links"): a caller on this
host reaches a service behind grpc_front straight over its abstract Unix socket.

The called side is a real NativeFront (its front process started, its link offered on its gRPC
port); the calling side is a LocalLinks on the test's loop, as an ensemble or BLS model's service
holds one. What the handlers see (metadata, deadline, cancellation) and what the caller gets back
(statuses, trailers, large messages) is checked the way test_front_calls.py checks gRPC calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from services.core import local_links
from services.core.front_calls import CallFailed
from services.core.local_links import LinkCaller, LocalLinks, local_port
from services.core.native_front import NativeFront, front_binary

pytestmark = pytest.mark.skipif(
    front_binary() is None,
    reason="grpc_front is not built (make native; needs Debian's libgrpc++-dev)",
)

MAX_MESSAGE_BYTES = 48 << 20
ECHO = "/test.Target/Echo"
HANG = "/test.Target/Hang"


@dataclass
class Target:
    """The called service's handlers: echo (or fail as asked), or hang until cancelled."""

    metadata: list[tuple[tuple[str, str | bytes], ...]] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    remaining: list[float | None] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        metadata = tuple(context.invocation_metadata() or ())
        self.metadata.append(metadata)  # type: ignore[arg-type]
        self.peers.append(context.peer())
        self.remaining.append(context.time_remaining())
        fail = dict(metadata).get("x-fail-code")  # type: ignore[arg-type]
        if isinstance(fail, str):
            context.set_trailing_metadata((("x-why", "asked"), ("why-bin", b"\x00\x01")))
            await context.abort(grpc.StatusCode[fail], "failed as asked")
        return bytes(request)

    async def hang(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.started.set()
        try:
            await asyncio.wait_for(self.release.wait(), 60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"released " + bytes(request)


@dataclass
class Served:
    front: NativeFront
    target: Target
    address: str  # 127.0.0.1:<the front's port>


async def serve(target: Target) -> NativeFront:
    binary = front_binary()
    assert binary is not None
    front = NativeFront(binary, MAX_MESSAGE_BYTES)
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(target.echo),
        "Hang": grpc.unary_unary_rpc_method_handler(target.hang),
    }
    front.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Target", handlers),))
    await front.start("127.0.0.1", 0)
    return front


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    target = Target()
    front = await serve(target)
    try:
        yield Served(front, target, f"127.0.0.1:{front.port}")
    finally:
        target.release.set()
        await front.stop(0)  # a second stop (after a test's own) does nothing more


@pytest.fixture
async def links() -> AsyncIterator[LocalLinks]:
    found = LocalLinks()
    try:
        yield found
    finally:
        found.close()


async def connected(links: LocalLinks, address: str) -> LinkCaller:
    caller = await links.connect(address)
    assert caller is not None, f"no local link to {address}"
    assert links.ready(address) is caller
    return caller


async def test_a_call_round_trips_over_the_link_with_its_metadata(
    served: Served, links: LocalLinks
) -> None:
    assert served.front.links.address == local_links.link_address(served.front.port)
    caller = await connected(links, served.address)
    sent = (("x-text", "v1"), ("X-Upper", "v2"), ("x-blob-bin", b"\x00\xff\x10"))
    assert await caller.unary(served.address, ECHO, b"hello", metadata=sent) == b"hello"
    assert await caller.unary(served.address, ECHO, b"") == b""  # an empty message is OK
    seen = served.target.metadata[0]
    assert ("x-text", "v1") in seen
    assert ("x-upper", "v2") in seen  # keys lower-cased, as gRPC sends them
    assert ("x-blob-bin", b"\x00\xff\x10") in seen
    assert served.target.peers[0].startswith("local:")  # not through the front
    assert served.target.remaining[0] is None  # no deadline given
    assert caller.pending == 0


async def test_a_failed_call_raises_its_status_details_and_trailers(
    served: Served, links: LocalLinks
) -> None:
    caller = await connected(links, served.address)
    with pytest.raises(CallFailed) as err:
        await caller.unary(served.address, ECHO, b"m", metadata=(("x-fail-code", "NOT_FOUND"),))
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.details == "failed as asked"
    assert ("x-why", "asked") in err.value.trailing_metadata
    assert ("why-bin", b"\x00\x01") in err.value.trailing_metadata
    with pytest.raises(CallFailed) as err:
        await caller.unary(served.address, "/test.Target/Nothing", b"m")
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert await caller.unary(served.address, ECHO, b"still") == b"still"


async def test_the_deadline_reaches_the_callee_and_an_expired_one_cancels_the_call(
    served: Served, links: LocalLinks
) -> None:
    caller = await connected(links, served.address)
    await caller.unary(served.address, ECHO, b"m", timeout=3.0)
    remaining = served.target.remaining[-1]
    assert remaining is not None and 2.0 < remaining <= 3.0
    with pytest.raises(CallFailed) as err:
        await caller.unary(served.address, HANG, b"m", timeout=0.3)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(served.target.cancelled.wait(), 5)  # CANCEL reached the callee
    assert caller.pending == 0
    assert await caller.unary(served.address, ECHO, b"after") == b"after"


async def test_cancelling_the_awaiting_task_cancels_the_call_on_the_callee(
    served: Served, links: LocalLinks
) -> None:
    caller = await connected(links, served.address)
    task = asyncio.ensure_future(caller.unary(served.address, HANG, b"m"))
    await asyncio.wait_for(served.target.started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(served.target.cancelled.wait(), 5)
    assert served.front.links.in_flight == 0


async def test_a_40_mb_message_round_trips_and_one_over_the_limit_is_refused(
    served: Served, links: LocalLinks
) -> None:
    caller = await connected(links, served.address)
    big = bytes(range(256)) * (40 * 1024 * 1024 // 256)
    assert bytes(await caller.unary(served.address, ECHO, big)) == big
    with pytest.raises(CallFailed) as err:
        await caller.unary(served.address, ECHO, b"x" * (MAX_MESSAGE_BYTES + 1))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details
    assert await caller.unary(served.address, ECHO, b"small") == b"small"


async def test_200_concurrent_calls_each_get_their_own_answer(
    served: Served, links: LocalLinks
) -> None:
    caller = await connected(links, served.address)
    answers = await asyncio.gather(
        *(caller.unary(served.address, ECHO, str(i).encode()) for i in range(200))
    )
    assert [bytes(a) for a in answers] == [str(i).encode() for i in range(200)]


async def test_a_stopping_service_finishes_calls_in_flight_and_refuses_new_ones(
    served: Served, links: LocalLinks
) -> None:
    target, front, address = served.target, served.front, served.address
    caller = await connected(links, address)
    stopping: asyncio.Task[None] | None = None
    try:
        in_flight = asyncio.ensure_future(caller.unary(address, HANG, b"m"))
        await asyncio.wait_for(target.started.wait(), 5)
        stopping = asyncio.create_task(front.stop(20))
        for _ in range(500):  # refusing from now on
            if not front.links.address:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(CallFailed) as err:
            await caller.unary(address, ECHO, b"new")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE  # a route retries it elsewhere
        assert "stopping" in err.value.details
        target.release.set()
        assert await asyncio.wait_for(in_flight, 10) == b"released m"
        await asyncio.wait_for(stopping, 30)
    finally:
        target.release.set()
        if stopping is not None:
            with contextlib.suppress(Exception):
                await stopping
    # the service is gone: its link closed, the port is not offered any more
    for _ in range(100):
        if links.ready(address) is None:
            break
        await asyncio.sleep(0.01)
    assert links.ready(address) is None
    assert await links.connect(address) is None
    with pytest.raises(CallFailed) as err:
        await caller.unary(address, ECHO, b"late")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_call_pending_when_the_service_goes_away_fails_unavailable(
    served: Served, links: LocalLinks
) -> None:
    target, front, address = served.target, served.front, served.address
    caller = await connected(links, address)
    pending = asyncio.ensure_future(caller.unary(address, HANG, b"m"))
    await asyncio.wait_for(target.started.wait(), 5)
    await front.stop(0)  # no grace: the call is cancelled and the link closed
    with pytest.raises(CallFailed) as err:
        await asyncio.wait_for(pending, 10)
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_links_are_only_for_loopback_targets_and_can_be_turned_off(
    served: Served, links: LocalLinks, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert local_port(served.address) == served.front.port
    assert local_port(f"localhost:{served.front.port}") == served.front.port
    assert local_port(f"10.1.2.3:{served.front.port}") is None
    assert local_port("my-service:8001") is None
    assert await links.connect(f"10.1.2.3:{served.front.port}") is None
    monkeypatch.setenv(local_links.ENV, "0")
    assert await links.connect(served.address) is None  # the caller's side is off
    off = await serve(Target())  # and a service started now offers none
    try:
        assert off.links.address == ""
    finally:
        await off.stop(0)


async def test_a_port_without_a_link_falls_back_and_is_not_retried_at_once(
    links: LocalLinks,
) -> None:
    server = grpc.aio.server()  # a gRPC server with no local link
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        assert await links.connect(f"127.0.0.1:{port}") is None
        assert port in links._unreachable  # remembered for RETRY_S
    finally:
        await server.stop(None)
