"""front_link: frames from grpc_front parsed however the socket splits them; frames to it batched."""

from __future__ import annotations

import asyncio
import struct

import pytest

from services.core import front_link as fl


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def on_call(self, start: fl.CallStart) -> None:
        self.events.append(("call", start))

    def on_message(self, call: int, payload: bytes | memoryview) -> None:
        self.events.append(("message", (call, payload)))

    def on_half_close(self, call: int) -> None:
        self.events.append(("half_close", call))

    def on_cancel(self, call: int) -> None:
        self.events.append(("cancel", call))

    def on_drained(self) -> None:
        self.events.append(("drained", None))

    def on_out_result(self, result: fl.OutResult) -> None:
        self.events.append(("out_result", result))

    def on_link_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))


def frame(kind: int, call: int, fields: bytes = b"") -> bytes:
    return struct.pack("<IBQ", 9 + len(fields), kind, call) + fields


def frame_length(data: bytes) -> int:
    """A frame's body length, from its first four bytes."""
    return int(struct.unpack_from("<I", data)[0])


def s16(text: bytes) -> bytes:
    return struct.pack("<H", len(text)) + text


def call_frame(
    call: int,
    method: bytes,
    payload: bytes,
    *,
    timeout_us: int = -1,
    flags: int = 0,
    meta: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    fields = struct.pack("<qB", timeout_us, flags) + s16(method) + s16(b"ipv4:127.0.0.1:5")
    fields += struct.pack("<H", len(meta))
    for key, value in meta:
        fields += s16(key) + struct.pack("<I", len(value)) + value
    return frame(fl.CALL, call, fields + payload)


def feed(link: fl.FrameLink, data: bytes, chunk: int) -> None:
    """Deliver ``data`` as the socket would, at most ``chunk`` bytes per read."""
    pos = 0
    while pos < len(data):
        buf = link.get_buffer(-1)
        n = min(chunk, len(buf), len(data) - pos)
        buf[:n] = data[pos : pos + n]
        link.buffer_updated(n)
        pos += n


def make_link() -> tuple[fl.FrameLink, Sink]:
    sink = Sink()
    return fl.FrameLink(sink), sink


@pytest.mark.parametrize("chunk", [1, 7, 13, 4096, 1 << 22])
async def test_frames_are_parsed_however_the_reads_split_them(chunk: int) -> None:
    link, sink = make_link()
    data = (
        call_frame(
            5,
            b"/inference.GRPCInferenceService/ModelInfer",
            b"request-bytes",
            timeout_us=2_500_000,
            meta=((b"x-test", b"v"), (b"trace-bin", b"\x00\xff")),
        )
        + call_frame(6, b"/s/Stream", b"", flags=fl.STREAMING_REQUEST)
        + frame(fl.MESSAGE, 6, b"m1")
        + frame(fl.HALF_CLOSE, 6)
        + frame(fl.CANCEL, 5)
        + frame(fl.DRAINED, 0)
    )
    feed(link, data, chunk)
    kinds = [kind for kind, _ in sink.events]
    assert kinds == ["call", "call", "message", "half_close", "cancel", "drained"]
    first = sink.events[0][1]
    assert isinstance(first, fl.CallStart)
    assert (first.call, first.method, first.timeout_us) == (
        5,
        "/inference.GRPCInferenceService/ModelInfer",
        2_500_000,
    )
    assert first.metadata == (("x-test", "v"), ("trace-bin", b"\x00\xff"))
    assert first.peer == "ipv4:127.0.0.1:5"
    assert first.payload == b"request-bytes" and not first.streaming_request
    second = sink.events[1][1]
    assert isinstance(second, fl.CallStart)
    assert second.streaming_request and second.payload == b""
    assert sink.events[2][1] == (6, b"m1")


async def test_a_short_payload_is_a_copy_the_next_reads_cannot_change() -> None:
    link, sink = make_link()
    feed(link, frame(fl.MESSAGE, 1, b"A" * 100), 1 << 20)
    # fill the shared buffer with other frames: the first payload must not change
    feed(link, frame(fl.MESSAGE, 2, b"B" * 100) * 20000, 1 << 16)
    payload = sink.events[0][1][1]  # type: ignore[index]
    assert isinstance(payload, bytes) and payload == b"A" * 100
    assert len(sink.events) == 20001


async def test_a_long_frame_gets_its_own_buffer_and_its_payload_is_a_view_of_it() -> None:
    link, sink = make_link()
    big = bytes(range(256)) * (3 * fl.SHARED_BUFFER_BYTES // 256)
    data = frame(fl.MESSAGE, 1, b"x") + call_frame(9, b"/m", big) + frame(fl.MESSAGE, 1, b"y")
    feed(link, data, 65536)
    assert [k for k, _ in sink.events] == ["message", "call", "message"]
    start = sink.events[1][1]
    assert isinstance(start, fl.CallStart)
    assert isinstance(start.payload, memoryview) and start.payload == big
    assert sink.events[2][1] == (1, b"y")


class RecordingTransport(asyncio.Transport):
    """Keeps every write (one bytes object per write call)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def writing_link() -> tuple[fl.FrameLink, list[bytes]]:
    """A connected link whose writes are recorded."""
    link, _ = make_link()
    transport = RecordingTransport()
    link.connection_made(transport)
    return link, transport.writes


async def test_frames_sent_while_other_work_is_ready_wait_for_the_iterations_one_write() -> None:
    link, writes = writing_link()
    loop = asyncio.get_running_loop()
    loop.call_soon(lambda: None)  # another call's work, ready in this iteration (a burst)
    link.send(fl.encode_finish(1, 0, "", b"zero"))
    link.send(fl.encode_finish(2, 0, "", b"one"))
    assert writes == []
    await asyncio.sleep(0)
    assert len(writes) == 1 and writes[0].endswith(b"one")


async def test_the_first_frame_of_an_iteration_goes_at_once_the_rest_in_one_write() -> None:
    link, writes = writing_link()
    first = fl.encode_finish(1, 0, "", b"zero")
    link.send(first)
    assert writes == [first]  # at low load the answer leaves at once
    link.send(fl.encode_message(3, b"one"))
    link.send(fl.encode_finish(3, 0, "", b"two"))
    assert len(writes) == 1  # the rest of this iteration's frames wait for its end ...
    await asyncio.sleep(0)
    assert len(writes) == 2  # ... and go out together, in order
    link.send(fl.encode_message(4, b"next"))
    assert len(writes) == 3  # a new iteration writes its first frame at once again
    # what the front reads back: MESSAGE then FINISH with its payload
    data = writes[1]
    length = frame_length(data)
    assert data[4:13] == struct.pack("<BQ", fl.MESSAGE, 3) and data[13 : 4 + length] == b"one"
    rest = data[4 + length :]
    code, has_payload, n = struct.unpack_from("<IBI", rest, 13)
    assert (code, has_payload, n) == (0, 1, 0)
    assert rest[22:] == b"\x00\x00two"  # no trailing metadata, then the payload


def test_finish_frames_carry_status_details_trailers_and_an_empty_payload() -> None:
    data = fl.encode_finish(7, 3, "bad input", b"", (("X-Key", "v"),))
    assert frame_length(data) == len(data) - 4
    kind, call, code, has_payload, n = struct.unpack_from("<BQIBI", data, 4)
    assert (kind, call, code, has_payload) == (fl.FINISH, 7, 3, 1)
    pos = 22
    assert data[pos : pos + n] == b"bad input"
    pos += n
    assert data[pos:] == struct.pack("<H", 1) + s16(b"x-key") + struct.pack("<I", 1) + b"v"
    no_payload = fl.encode_finish(7, 0)
    assert struct.unpack_from("<B", no_payload, 17)[0] == 0


def out_result_frame(
    call: int,
    code: int,
    details: bytes = b"",
    payload: bytes | None = None,
    meta: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """OUT_RESULT as grpc_front writes it (PROTOCOL.md)."""
    fields = struct.pack("<II", code, len(details)) + details + struct.pack("<H", len(meta))
    for key, value in meta:
        fields += s16(key) + struct.pack("<I", len(value)) + value
    fields += struct.pack("<B", payload is not None) + (payload or b"")
    return frame(fl.OUT_RESULT, call, fields)


OUT = 1 << 63  # the service's outbound call ids


@pytest.mark.parametrize("chunk", [1, 5, 13, 4096, 1 << 22])
async def test_out_result_frames_are_parsed_however_the_reads_split_them(chunk: int) -> None:
    link, sink = make_link()
    data = (
        out_result_frame(OUT | 1, 0, payload=b"response")
        + frame(fl.MESSAGE, 4, b"m")
        + out_result_frame(
            OUT | 2,
            5,
            "no such model «x»".encode(),
            meta=((b"x-why", b"gone"), (b"detail-bin", b"\x00\x01\xff")),
        )
        + out_result_frame(OUT | 3, 0, payload=b"")  # an OK answer with an empty message
    )
    feed(link, data, chunk)
    assert [k for k, _ in sink.events] == ["out_result", "message", "out_result", "out_result"]
    ok, failed, empty = (e[1] for e in sink.events if e[0] == "out_result")
    assert ok == fl.OutResult(OUT | 1, 0, "", (), b"response")
    assert failed == fl.OutResult(
        OUT | 2, 5, "no such model «x»", (("x-why", "gone"), ("detail-bin", b"\x00\x01\xff")), None
    )
    assert isinstance(empty, fl.OutResult) and empty.payload == b"" and empty.code == 0


async def test_a_long_out_result_payload_is_a_view_of_its_frames_own_buffer() -> None:
    link, sink = make_link()
    big = bytes(range(256)) * (3 * fl.SHARED_BUFFER_BYTES // 256)
    feed(link, out_result_frame(OUT | 7, 0, payload=big, meta=((b"k", b"v"),)), 65536)
    ((kind, result),) = sink.events
    assert kind == "out_result" and isinstance(result, fl.OutResult)
    assert isinstance(result.payload, memoryview) and result.payload == big
    assert result.metadata == (("k", "v"),)


def parse_out_call(data: bytes) -> tuple[int, int, bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    """OUT_CALL as grpc_front reads it (PROTOCOL.md): call, timeout, target, method, meta, payload."""
    assert frame_length(data) == len(data) - 4
    kind, call, timeout_us = struct.unpack_from("<BQq", data, 4)
    assert kind == fl.OUT_CALL
    pos = 21

    def field(length: str) -> bytes:
        nonlocal pos
        (n,) = struct.unpack_from(length, data, pos)
        pos += struct.calcsize(length)
        pos += n
        return data[pos - n : pos]

    target, method = field("<H"), field("<H")
    (count,) = struct.unpack_from("<H", data, pos)
    pos += 2
    meta = [(field("<H"), field("<I")) for _ in range(count)]
    return call, timeout_us, target, method, meta, data[pos:]


def test_out_call_frames_carry_target_method_deadline_metadata_and_request() -> None:
    meta = fl.encode_meta((("X-Trace", "abc"), ("ctx-bin", b"\x00\xff"), ("latin", "é")))
    data = fl.encode_out_call(
        OUT | 42, b"127.0.0.1:8001", b"/s.S/M", b"\x08\x01request", meta, 1_500_000
    )
    assert parse_out_call(data) == (
        OUT | 42,
        1_500_000,
        b"127.0.0.1:8001",
        b"/s.S/M",
        [(b"x-trace", b"abc"), (b"ctx-bin", b"\x00\xff"), (b"latin", b"\xe9")],
        b"\x08\x01request",
    )
    # no metadata, no deadline, an empty request message
    assert parse_out_call(fl.encode_out_call(OUT, b"h:1", b"/a/b", b"")) == (
        OUT,
        -1,
        b"h:1",
        b"/a/b",
        [],
        b"",
    )


def test_out_cancel_frames_name_the_call() -> None:
    data = fl.encode_out_cancel(OUT | 9)
    assert data == struct.pack("<IBQ", 9, fl.OUT_CANCEL, OUT | 9)
