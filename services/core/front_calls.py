"""Outbound unary gRPC calls made by grpc_front on the service's behalf (native/PROTOCOL.md).

A ``grpc.aio`` channel spends much of a call's CPU in Python; through the front, a call is one
OUT_CALL frame out and one OUT_RESULT frame back on the link the front already has, and gRPC
runs in C++. ``FrontCaller.unary`` sends the request message's bytes and returns the response
message's bytes (a memoryview for a long one), or raises ``CallFailed`` with the call's status.

``NativeFront`` (native_front.py) owns one caller, ``NativeFront.caller``. Code with no handle on
the server finds it with ``current_caller()``: the caller of the front started on the running
event loop, None where no front runs on it (use a ``grpc.aio`` channel then). NativeFront
registers its caller with ``set_current_caller`` when it starts and removes it with
``clear_current_caller`` when it stops. A caller is tied to its front's loop, so each loop sees
only its own (tests run several services in one process, each on a loop of its own).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence

import grpc

from services.core.front_link import (
    Metadata,
    OutResult,
    encode_meta,
    encode_out_call,
    encode_out_cancel,
)

#: the service's call ids have the top bit set, so they never collide with the front's own
OUTBOUND_ID_BIT = 1 << 63

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class CallFailed(Exception):
    """An outbound call that ended with a status other than OK."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: Metadata = ()
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class FrontCaller:
    """Unary calls through one front; ``attach`` gives it the link, ``close`` takes it away."""

    def __init__(self) -> None:
        self._send: Callable[[bytes], None] | None = None
        self._closed_because = "the gRPC front is not started"
        self._pending: dict[int, asyncio.Future[OutResult]] = {}
        self._next = 0

    def attach(self, send: Callable[[bytes], None]) -> None:
        """Calls go out through ``send`` (the front's link) from now on."""
        self._send = send

    def close(self, why: str) -> None:
        """The front is gone: pending and later calls fail with UNAVAILABLE (``why``)."""
        self._send = None
        self._closed_because = why
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(CallFailed(grpc.StatusCode.UNAVAILABLE, why))

    @property
    def pending(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._pending)

    async def unary(
        self,
        target: str,
        method: str,
        request: bytes | bytearray | memoryview,
        *,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        timeout: float | None = None,  # noqa: ASYNC109 - the call's gRPC deadline, run by the front
    ) -> bytes | memoryview:
        """Call ``method`` (``/package.Service/Method``) on ``target`` (``host:port``) with the
        serialized ``request``; the serialized response, or ``CallFailed``."""
        send = self._send
        if send is None:
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, self._closed_because)
        call = OUTBOUND_ID_BIT | self._next
        timeout_us = -1 if timeout is None else max(0, int(timeout * 1e6))
        meta = encode_meta(metadata) if metadata else b"\0\0"
        frame = self._call_frame(call, target, method, request, meta, timeout_us)
        # registered only once the frame is made: a bad argument leaves nothing pending
        self._next = (self._next + 1) & (OUTBOUND_ID_BIT - 1)
        future: asyncio.Future[OutResult] = asyncio.get_running_loop().create_future()
        self._pending[call] = future
        send(frame)
        try:
            result = await future
        except asyncio.CancelledError:
            # Still pending: the front is still calling. Its result is dropped when it comes.
            if self._pending.pop(call, None) is not None and self._send is not None:
                self._send(self._cancel_frame(call))
            raise
        if result.code == 0:
            if result.payload is None:
                raise CallFailed(grpc.StatusCode.INTERNAL, "the front answered OK with no message")
            return result.payload
        code = _CODES.get(result.code, grpc.StatusCode.UNKNOWN)
        raise CallFailed(code, result.details, result.metadata)

    def _call_frame(
        self,
        call: int,
        target: str,
        method: str,
        request: bytes | bytearray | memoryview,
        meta: bytes,
        timeout_us: int,
    ) -> bytes:
        """The frame that starts a call (OUT_CALL: the front makes it)."""
        return encode_out_call(call, target.encode(), method.encode(), request, meta, timeout_us)

    def _cancel_frame(self, call: int) -> bytes:
        return encode_out_cancel(call)

    def on_result(self, result: OutResult) -> None:
        """OUT_RESULT from the front (results of calls no longer waited on are dropped)."""
        future = self._pending.pop(result.call, None)
        if future is not None and not future.done():
            future.set_result(result)


_callers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FrontCaller] = (
    weakref.WeakKeyDictionary()
)


def current_caller() -> FrontCaller | None:
    """The caller of the front running on this event loop (None: no front runs here)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return _callers.get(loop)


def set_current_caller(caller: FrontCaller) -> None:
    """Make ``caller`` this event loop's ``current_caller()`` (NativeFront.start)."""
    _callers[asyncio.get_running_loop()] = caller


def clear_current_caller(caller: FrontCaller) -> None:
    """Forget ``caller`` if it is this loop's current one (NativeFront.stop)."""
    loop = asyncio.get_running_loop()
    if _callers.get(loop) is caller:
        del _callers[loop]
