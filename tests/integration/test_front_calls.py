"""Outbound unary calls through grpc_front (front_calls.py, native/PROTOCOL.md "Outbound calls").

A real front (NativeFront) makes the calls; the target is a real grpc.aio server on 127.0.0.1,
so what the target sees (metadata, cancellation) is what another service would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from services.core.front_calls import CallFailed, FrontCaller, current_caller
from services.core.front_link import VIEW_MIN_BYTES
from services.core.native_front import NativeFront, front_binary

pytestmark = pytest.mark.skipif(
    front_binary() is None,
    reason="grpc_front is not built (make native; needs Debian's libgrpc++-dev)",
)

MAX_MESSAGE_BYTES = 64 << 20
ECHO = "/test.Target/Echo"
HANG = "/test.Target/Hang"


class Target:
    """The called service: echoes requests, fails on request, or hangs until cancelled."""

    def __init__(self) -> None:
        self.metadata: list[tuple[tuple[str, str | bytes], ...]] = []
        self.hanging = asyncio.Condition()
        self.hung = 0
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.address = ""

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        metadata = tuple((m.key, m.value) for m in context.invocation_metadata() or ())
        self.metadata.append(metadata)
        fail = dict(metadata).get("x-fail-code")
        if isinstance(fail, str):
            context.set_trailing_metadata((("x-why", "asked"), ("why-bin", b"\x00\x01")))
            await context.abort(grpc.StatusCode[fail], "failed as asked")
        return request

    async def hang(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        async with self.hanging:
            self.hung += 1
            self.hanging.notify_all()
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"woke up"


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target()
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(t.echo),
        "Hang": grpc.unary_unary_rpc_method_handler(t.hang),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Target", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    t.address = f"127.0.0.1:{port}"
    try:
        yield t
    finally:
        await server.stop(0)


@pytest.fixture
async def front() -> AsyncIterator[NativeFront]:
    binary = front_binary()
    assert binary is not None
    f = NativeFront(binary, MAX_MESSAGE_BYTES)
    try:
        await f.start("127.0.0.1", 0)
        yield f
    finally:
        await f.stop(0)


@pytest.fixture
def refused_address() -> Iterator[str]:
    """An address that refuses connections: a port bound (so no one else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def test_a_unary_call_round_trips_and_the_front_is_this_loops_current_caller(
    front: NativeFront, target: Target
) -> None:
    assert current_caller() is front.caller
    assert await front.caller.unary(target.address, ECHO, b"hello") == b"hello"
    assert await front.caller.unary(target.address, ECHO, b"") == b""  # an empty message is OK
    assert front.caller.pending == 0


async def test_metadata_reaches_the_target_text_and_binary(
    front: NativeFront, target: Target
) -> None:
    sent = (("x-text", "v1"), ("X-Upper", "v2"), ("x-blob-bin", b"\x00\xff\x10"))
    await front.caller.unary(target.address, ECHO, b"m", metadata=sent)
    (seen,) = target.metadata
    assert ("x-text", "v1") in seen
    assert ("x-upper", "v2") in seen  # gRPC keys are lower-case
    assert ("x-blob-bin", b"\x00\xff\x10") in seen


async def test_a_failed_call_raises_its_status_details_and_trailers(
    front: NativeFront, target: Target
) -> None:
    with pytest.raises(CallFailed) as err:
        await front.caller.unary(
            target.address, ECHO, b"m", metadata=[("x-fail-code", "NOT_FOUND")]
        )
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert err.value.details == "failed as asked"
    assert ("x-why", "asked") in err.value.trailing_metadata
    assert ("why-bin", b"\x00\x01") in err.value.trailing_metadata


async def test_illegal_metadata_is_refused_and_the_front_keeps_calling(
    front: NativeFront, target: Target
) -> None:
    for bad in (("bad key", "v"), ("x-text", "line\nbreak"), ("grpc-timeout", "1S")):
        with pytest.raises(CallFailed) as err:
            await front.caller.unary(target.address, ECHO, b"m", metadata=[bad])
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert err.value.details.startswith("grpc_front: illegal metadata")
    assert target.metadata == []  # refused by the front, never sent
    assert await front.caller.unary(target.address, ECHO, b"still") == b"still"


async def test_a_deadline_that_expires_is_deadline_exceeded(
    front: NativeFront, target: Target
) -> None:
    began = time.monotonic()
    with pytest.raises(CallFailed) as err:
        await front.caller.unary(target.address, HANG, b"", timeout=0.3)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 <= time.monotonic() - began < 10
    await asyncio.wait_for(target.cancelled.wait(), 10)  # the target's handler was stopped too


async def test_a_deadline_already_past_fails_without_calling(
    front: NativeFront, target: Target
) -> None:
    for timeout in (0.0, -1.0):
        with pytest.raises(CallFailed) as err:
            await front.caller.unary(target.address, ECHO, b"late", timeout=timeout)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert target.metadata == []


async def test_cancelling_the_awaiting_task_cancels_the_call_on_the_target(
    front: NativeFront, target: Target
) -> None:
    task = asyncio.create_task(front.caller.unary(target.address, HANG, b""))
    await asyncio.wait_for(target.started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(target.cancelled.wait(), 10)
    assert front.caller.pending == 0
    # the CANCELLED result that still comes back is dropped; the caller goes on working
    assert await front.caller.unary(target.address, ECHO, b"after") == b"after"


async def test_a_target_that_refuses_connections_is_unavailable(
    front: NativeFront, refused_address: str
) -> None:
    with pytest.raises(CallFailed) as err:
        await front.caller.unary(refused_address, ECHO, b"m", timeout=20)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_40_mb_request_and_response_round_trip(front: NativeFront, target: Target) -> None:
    request = bytes(range(256)) * (40 * 1024 * 1024 // 256) + b"end"
    response = await front.caller.unary(target.address, ECHO, request, timeout=60)
    assert len(response) == len(request) and response == request
    assert isinstance(response, memoryview) and len(response) >= VIEW_MIN_BYTES  # not copied


async def test_200_concurrent_calls_are_each_answered_with_their_own_response(
    front: NativeFront, target: Target
) -> None:
    requests = [f"request {n} ".encode() * (1 + n % 50) for n in range(200)]
    responses = await asyncio.wait_for(
        asyncio.gather(*(front.caller.unary(target.address, ECHO, r) for r in requests)), 60
    )
    assert [bytes(r) for r in responses] == requests
    assert front.caller.pending == 0


async def test_a_killed_front_fails_pending_and_later_calls_with_unavailable(
    front: NativeFront, target: Target
) -> None:
    caller = front.caller
    pending = [asyncio.create_task(caller.unary(target.address, HANG, b"")) for _ in range(5)]
    async with target.hanging:
        await asyncio.wait_for(target.hanging.wait_for(lambda: target.hung == 5), 10)
    assert front._process is not None
    os.kill(front._process.pid, signal.SIGKILL)
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
    for result in results:
        assert isinstance(result, CallFailed), result
        assert result.code == grpc.StatusCode.UNAVAILABLE
        assert "front" in result.details
    assert front.closed.is_set() and caller.pending == 0
    began = time.monotonic()
    with pytest.raises(CallFailed) as err:
        await caller.unary(target.address, ECHO, b"m")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - began < 1


async def test_calls_fail_at_once_before_start_and_after_stop(target: Target) -> None:
    binary = front_binary()
    assert binary is not None
    f = NativeFront(binary, MAX_MESSAGE_BYTES)
    with pytest.raises(CallFailed) as err:
        await f.caller.unary(target.address, ECHO, b"m")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    await f.start("127.0.0.1", 0)
    await f.stop(0)
    assert current_caller() is None
    with pytest.raises(CallFailed) as err:
        await f.caller.unary(target.address, ECHO, b"m")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


async def test_calls_finishing_while_the_front_drains_can_still_call_out(target: Target) -> None:
    """SHUTDOWN stops new inbound calls, but a call in its grace period may call other services."""
    binary = front_binary()
    assert binary is not None
    f = NativeFront(binary, MAX_MESSAGE_BYTES)
    entered, release = asyncio.Event(), asyncio.Event()

    async def relay(request: bytes, context: object) -> bytes:
        entered.set()
        await release.wait()
        caller = current_caller()
        assert isinstance(caller, FrontCaller)
        return bytes(await caller.unary(target.address, ECHO, b"relayed " + request))

    handlers = {"Relay": grpc.unary_unary_rpc_method_handler(relay)}
    f.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Relay", handlers),))
    await f.start("127.0.0.1", 0)
    stopping: asyncio.Task[None] | None = None
    address = f"127.0.0.1:{f.port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            inbound = asyncio.ensure_future(
                channel.unary_unary("/test.Relay/Relay")(b"x", timeout=30)
            )
            await asyncio.wait_for(entered.wait(), 10)
            stopping = asyncio.create_task(f.stop(20))
            await _until_refused(address)  # the front is draining: it takes no new calls
            release.set()
            assert await inbound == b"relayed x"
        await asyncio.wait_for(stopping, 30)
    finally:
        release.set()
        if stopping is None:
            await f.stop(0)
        else:
            with contextlib.suppress(Exception):
                await stopping


async def _until_refused(address: str) -> None:
    """Waits until new calls to ``address`` fail (the front got SHUTDOWN)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                await channel.unary_unary("/test.Relay/Nothing")(b"", timeout=1)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{address} still takes new calls 10 s after SHUTDOWN")
