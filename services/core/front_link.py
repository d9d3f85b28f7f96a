"""The service's end of the Unix socket to grpc_front: frames in, frames out (native/PROTOCOL.md).

``FrameLink`` is an asyncio ``BufferedProtocol``: the kernel writes straight into its buffer and
every complete frame is handed to its ``FrameSink`` as it is found, many per read under load.
A frame too large for the shared buffer gets a buffer of its own that the socket fills directly,
and its payload reaches the sink as a view of that buffer: a large ModelInfer message is never
copied on this side. Frames the service sends are gathered and written once per loop iteration.

The same link carries the service's outbound unary calls: OUT_CALL / OUT_CANCEL out, OUT_RESULT
in (front_calls.py waits on them).

A local link (local_links.py) is the same protocol with another service in the front's place:
the calling side sends CALL / CANCEL (``encode_call``, ``encode_cancel``) and gets the answer
as FINISH, which its sink receives as an ``OutResult``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.core.busy_poll import nothing_else_ready

# frame kinds (PROTOCOL.md)
CALL, MESSAGE, HALF_CLOSE, CANCEL, FINISH, SHUTDOWN, DRAINED = 1, 2, 3, 4, 5, 6, 7
OUT_CALL, OUT_CANCEL, OUT_RESULT = 8, 9, 10
STREAMING_REQUEST = 1  # CALL flags bit 0

_HEAD = struct.Struct("<IBQ")  # body length, kind, call
_CALL = struct.Struct("<qB")  # timeout_us, flags
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_FINISH = struct.Struct("<IBQIBI")  # body length, kind, call, code, has_payload, details length
_SHUTDOWN = struct.Struct("<IBQI")
_OUT_CALL = struct.Struct("<IBQqH")  # body length, kind, call, timeout_us, target length
_OUT_RESULT = struct.Struct("<II")  # code, details length
_FINISH_BODY = struct.Struct("<IBI")  # code, has_payload, details length

#: reads land in a shared buffer of this size; a longer frame gets a buffer of its own
SHARED_BUFFER_BYTES = 1 << 20
#: payloads at least this long, in a frame with its own buffer, are handed over as views
VIEW_MIN_BYTES = 32 * 1024

Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(slots=True)
class CallStart:
    """A CALL frame: one RPC as the client started it."""

    call: int
    method: str
    timeout_us: int  # -1: no deadline
    streaming_request: bool
    peer: str
    metadata: Metadata
    payload: bytes | memoryview  # the request message (empty for streaming-request calls)


@dataclass(slots=True)
class OutResult:
    """An OUT_RESULT frame: how one of the service's outbound calls ended."""

    call: int
    code: int  # grpc status code
    details: str
    metadata: Metadata  # the response's trailing metadata
    payload: bytes | memoryview | None  # the response message (status OK only)


class FrameSink(Protocol):
    """What the link hands complete frames to (native_front.Dispatcher)."""

    def on_call(self, start: CallStart) -> None: ...
    def on_message(self, call: int, payload: bytes | memoryview) -> None: ...
    def on_half_close(self, call: int) -> None: ...
    def on_cancel(self, call: int) -> None: ...
    def on_drained(self) -> None: ...
    def on_out_result(self, result: OutResult) -> None: ...
    def on_link_lost(self, exc: Exception | None) -> None: ...


def parse_call(call: int, body: memoryview, owned: bool = False) -> CallStart:
    """The fields of a CALL frame's body (after kind and call); ``owned``: the body's buffer
    belongs to this frame alone, so its payload may stay a view of it."""
    timeout_us, flags = _CALL.unpack_from(body, 0)
    method, pos = _field(body, _CALL.size, _U16)
    peer, pos = _field(body, pos, _U16)
    metadata, pos = _meta(body, pos)
    return CallStart(
        call,
        method.decode("utf-8"),
        timeout_us,
        bool(flags & STREAMING_REQUEST),
        peer.decode("utf-8"),
        metadata,
        _payload(body[pos:], owned),
    )


def parse_finish(call: int, body: memoryview, owned: bool = False) -> OutResult:
    """A FINISH frame's body (after kind and call) as the result of the call it ends."""
    code, has_payload, n = _FINISH_BODY.unpack_from(body, 0)
    pos = _FINISH_BODY.size
    details = bytes(body[pos : pos + n]).decode("utf-8", "replace")
    metadata, pos = _meta(body, pos + n)
    return OutResult(
        call, code, details, metadata, _payload(body[pos:], owned) if has_payload else None
    )


def parse_out_result(call: int, body: memoryview, owned: bool = False) -> OutResult:
    """The fields of an OUT_RESULT frame's body (after kind and call); ``owned`` as for CALL."""
    code, n = _OUT_RESULT.unpack_from(body, 0)
    pos = _OUT_RESULT.size
    details = bytes(body[pos : pos + n]).decode("utf-8", "replace")
    metadata, pos = _meta(body, pos + n)
    payload = _payload(body[pos + 1 :], owned) if body[pos] else None
    return OutResult(call, code, details, metadata, payload)


def _meta(body: memoryview, pos: int) -> tuple[Metadata, int]:
    """The ``meta`` field at ``pos`` (``-bin`` values stay bytes) and the position after it."""
    (count,) = _U16.unpack_from(body, pos)
    pos += 2
    metadata: list[tuple[str, str | bytes]] = []
    for _ in range(count):
        key_bytes, pos = _field(body, pos, _U16)
        raw, pos = _field(body, pos, _U32)
        key = key_bytes.decode("ascii")
        metadata.append((key, raw if key.endswith("-bin") else raw.decode("latin-1")))
    return tuple(metadata), pos


def _field(body: memoryview, pos: int, length: struct.Struct) -> tuple[bytes, int]:
    """The length-prefixed bytes at ``pos`` and the position after them."""
    (n,) = length.unpack_from(body, pos)
    start = pos + length.size
    return bytes(body[start : start + n]), start + n


def _payload(payload: memoryview, owned: bool) -> bytes | memoryview:
    """A view when the frame has a buffer of its own and the payload is long, else a copy."""
    return payload if owned and len(payload) >= VIEW_MIN_BYTES else bytes(payload)


def encode_call(
    call: int,
    method: bytes,
    peer: bytes,
    payload: bytes | bytearray | memoryview,
    meta: bytes = b"\0\0",
    timeout_us: int = -1,
) -> bytes:
    """CALL for a unary method (a local link's caller); ``meta`` from ``encode_meta``."""
    body = 9 + 8 + 1 + 2 + len(method) + 2 + len(peer) + len(meta) + len(payload)
    head = _HEAD.pack(body, CALL, call) + _CALL.pack(timeout_us, 0)
    return b"".join(
        (head, _U16.pack(len(method)), method, _U16.pack(len(peer)), peer, meta, payload)
    )


def encode_cancel(call: int) -> bytes:
    return _HEAD.pack(9, CANCEL, call)


def encode_message(call: int, payload: bytes) -> bytes:
    return _HEAD.pack(9 + len(payload), MESSAGE, call) + payload


def encode_finish(
    call: int,
    code: int,
    details: str = "",
    payload: bytes | None = None,
    trailing: Sequence[tuple[str, str | bytes]] = (),
) -> bytes:
    text = details.encode("utf-8")
    tail = encode_meta(trailing)
    body = 9 + 4 + 1 + 4 + len(text) + len(tail) + (len(payload) if payload is not None else 0)
    head = _FINISH.pack(body, FINISH, call, code, payload is not None, len(text))
    return b"".join((head, text, tail, payload or b""))


def encode_shutdown(grace_ms: int) -> bytes:
    return _SHUTDOWN.pack(9 + 4, SHUTDOWN, 0, grace_ms)


def encode_meta(metadata: Sequence[tuple[str, str | bytes]]) -> bytes:
    """A ``meta`` field: keys lower-cased (as gRPC sends them), text values as latin-1."""
    meta = [_U16.pack(len(metadata))]
    for key, value in metadata:
        k = key.lower().encode("ascii")
        v = value.encode("latin-1") if isinstance(value, str) else value
        meta += (_U16.pack(len(k)), k, _U32.pack(len(v)), v)
    return b"".join(meta)


def encode_out_call(
    call: int,
    target: bytes,
    method: bytes,
    payload: bytes | bytearray | memoryview,
    meta: bytes = b"\0\0",
    timeout_us: int = -1,
) -> bytes:
    """OUT_CALL; ``target``, ``method`` encoded, ``meta`` from ``encode_meta`` (default: none)."""
    body = 9 + 8 + 2 + len(target) + 2 + len(method) + len(meta) + len(payload)
    head = _OUT_CALL.pack(body, OUT_CALL, call, timeout_us, len(target))
    return b"".join((head, target, _U16.pack(len(method)), method, meta, payload))


def encode_out_cancel(call: int) -> bytes:
    return _HEAD.pack(9, OUT_CANCEL, call)


class FrameLink(asyncio.BufferedProtocol):
    """Frames from the front to ``sink``; ``send`` queues frames to the front."""

    def __init__(self, sink: FrameSink) -> None:
        self._sink = sink
        self._shared = bytearray(SHARED_BUFFER_BYTES)
        self._view = memoryview(self._shared)
        self._start = 0  # first unparsed byte in the shared buffer
        self._end = 0  # end of the received bytes in the shared buffer
        self._big: bytearray | None = None  # a long frame's own buffer (body only), being filled
        self._big_kind = 0
        self._big_call = 0
        self._big_filled = 0
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._sent_now = False  # a frame was written at once in this loop iteration
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ---- asyncio protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self.connected.done():
            self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._sink.on_link_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_filled :]
        if self._end == len(self._shared):  # full: keep the unparsed tail, at the front
            tail = self._end - self._start
            self._shared[:tail] = self._view[self._start : self._end]
            self._start, self._end = 0, tail
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled == len(self._big):
                body = memoryview(self._big)
                self._big = None
                self._frame(self._big_kind, self._big_call, body[9:], owned=True)
            return
        self._end += nbytes
        self._parse()

    def _parse(self) -> None:
        view, start, end = self._view, self._start, self._end
        while end - start >= 13:
            length, kind, call = _HEAD.unpack_from(view, start)
            total = 4 + length
            if end - start < total:
                if total > len(self._shared) // 2:  # long: give it a buffer of its own
                    self._take_big(length, kind, call, view[start + 4 : end])
                    start = end
                break
            self._frame(kind, call, view[start + 13 : start + total], owned=False)
            start += total
        if start == end:
            start = end = 0
        self._start, self._end = start, end

    def _take_big(self, length: int, kind: int, call: int, received: memoryview) -> None:
        self._big = bytearray(length)
        self._big[: len(received)] = received
        self._big_filled = len(received)
        self._big_kind, self._big_call = kind, call

    def _frame(self, kind: int, call: int, body: memoryview, owned: bool) -> None:
        sink = self._sink
        if kind == CALL:
            sink.on_call(parse_call(call, body, owned))
        elif kind == MESSAGE:
            sink.on_message(call, _payload(body, owned))
        elif kind == HALF_CLOSE:
            sink.on_half_close(call)
        elif kind == CANCEL:
            sink.on_cancel(call)
        elif kind == OUT_RESULT:
            sink.on_out_result(parse_out_result(call, body, owned))
        elif kind == FINISH:  # a local link's answer to our CALL
            sink.on_out_result(parse_finish(call, body, owned))
        elif kind == DRAINED:
            sink.on_drained()

    # ---- frames to the front -------------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        """Send one frame: the first of a loop iteration at once, the others of that iteration
        together in one write when it ends.

        At low load the answer leaves as soon as it is made, instead of after everything else
        the loop runs this iteration (the batch's bookkeeping, the scheduler's next pass); under
        load each iteration still makes at most two writes, however many calls it answers.
        """
        if self._out:
            self._out.append(frame)
            return
        loop = asyncio.get_running_loop()
        if not self._sent_now and nothing_else_ready(loop):
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(frame)
                self._sent_now = True
                loop.call_soon(self._next_iteration)
            return
        self._out.append(frame)
        loop.call_soon(self._flush)

    def _next_iteration(self) -> None:
        self._sent_now = False

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()
