"""gRPC through grpc_front: a C++ process owns the port, this module runs the calls.

grpc.aio spends about 0.2 ms of CPU per call here, most of it in its own machinery; with the
front, gRPC runs in C++ and each call reaches Python as one frame on a Unix socket
(front_link.py, native/PROTOCOL.md). ``NativeFront`` takes the same handler tables as a
``grpc.aio.Server`` (``add_generic_rpc_handlers``, ``add_registered_method_handlers``), so the
generated ``add_*Servicer_to_server`` functions work unchanged, and runs each handler with a
``FrontContext`` that answers what our servicers ask of a ``grpc.aio.ServicerContext``.

The front also makes the service's outbound unary calls: ``NativeFront.caller`` (front_calls.py).

``front_binary()`` finds the front (built by ``make native``); server.py falls back to grpc.aio
where it is not built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from services.core.front_calls import FrontCaller, clear_current_caller, set_current_caller
from services.core.front_link import (
    CallStart,
    FrameLink,
    Metadata,
    OutResult,
    encode_finish,
    encode_message,
    encode_shutdown,
)

log = logging.getLogger(__name__)

#: where ``make native`` puts the front; MESHSERVE_GRPC_FRONT overrides
DEFAULT_BINARY = Path(__file__).parent / "native" / "build" / "grpc_front"


def front_binary() -> Path | None:
    """The grpc_front executable, or None where it is not built."""
    path = Path(os.environ.get("MESHSERVE_GRPC_FRONT", "") or DEFAULT_BINARY)
    return path if path.is_file() and os.access(path, os.X_OK) else None


class FrontContext:
    """The subset of ``grpc.aio.ServicerContext`` a handler run through the front can use."""

    __slots__ = ("_deadline", "_start", "cancelled_", "code", "details", "trailing")

    def __init__(self, start: CallStart) -> None:
        self._start = start
        self._deadline = None if start.timeout_us < 0 else time.monotonic() + start.timeout_us / 1e6
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: Metadata = ()
        self.cancelled_ = False

    def invocation_metadata(self) -> Metadata:
        return self._start.metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        return self._start.peer

    def cancelled(self) -> bool:
        return self.cancelled_

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self.trailing = tuple(metadata)

    def set_compression(self, compression: grpc.Compression) -> None:
        """Responses are sent as the front's channel arguments say; accepted and ignored."""

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> NoReturn:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status other than OK")
        self.code, self.details = code, details
        if trailing_metadata:
            self.trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: Metadata) -> None:
        self.method = method
        self.invocation_metadata = metadata


class _Call:
    """One call in flight: its task, context, and (streaming requests) its message queue."""

    __slots__ = ("context", "messages", "task")

    def __init__(self, context: FrontContext) -> None:
        self.task: asyncio.Task[None] | None = None
        self.context = context
        self.messages: asyncio.Queue[bytes | memoryview | None] | None = None


class NativeFront:
    """A gRPC server made of a grpc_front process and the handlers run here."""

    def __init__(self, binary: Path, max_message_bytes: int) -> None:
        self._binary = binary
        self._max_message_bytes = max_message_bytes
        self._generic: list[grpc.GenericRpcHandler[Any, Any]] = []
        self._methods: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}
        self._calls: dict[int, _Call] = {}
        self._link: FrameLink | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._server: asyncio.AbstractServer | None = None
        self._folder = ""
        self._drained: asyncio.Event = asyncio.Event()
        self.port = 0
        #: outbound unary calls through this front (usable once started, failing once stopped)
        self.caller = FrontCaller()
        #: set when the front's link is gone (the front exited or was stopped)
        self.closed: asyncio.Event = asyncio.Event()

    # ---- the grpc.aio.Server surface the generated code uses -------------------------------------
    def add_generic_rpc_handlers(
        self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Start the front on host:port (0: any free port); returns the bound port."""
        loop = asyncio.get_running_loop()
        self._folder = tempfile.mkdtemp(prefix="meshserve-front-")
        path = str(Path(self._folder) / "link.sock")
        link = FrameLink(self)
        self._server = await loop.create_unix_server(lambda: link, path)
        streaming = [m for m, h in self._all_methods() if h.request_streaming]
        args = [
            str(self._binary),
            "--listen",
            f"{host}:{port}",
            "--backend",
            path,
            "--max-message-bytes",
            str(self._max_message_bytes),
        ]
        for method in streaming:
            args += ["--streaming-request", method]
        self._process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line.startswith(b"listening "):
            code = await self._process.wait()
            self._cleanup_folder()
            raise OSError(f"cannot bind gRPC port {host}:{port} (grpc_front exited {code})")
        await link.connected
        self._link = link
        self.caller.attach(link.send)
        set_current_caller(self.caller)
        self.port = int(line.split()[1])
        log.info("gRPC front %s serving %s:%d", self._binary.name, host, self.port)
        return self.port

    async def stop(self, grace: float | None) -> None:
        """Stop taking calls; calls in flight get ``grace`` seconds, then are cancelled."""
        grace = 0.0 if grace is None else grace
        if self._link is not None and not self.closed.is_set():
            self._link.send(encode_shutdown(int(grace * 1000)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace + 5.0)
        for call in list(self._calls.values()):
            if call.task is not None:
                call.task.cancel()
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), 5.0)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._link is not None:
            self._link.close()
        # only now: the calls still finishing during the grace period may call out
        clear_current_caller(self.caller)
        self.caller.close("the gRPC front is stopped")
        if self._server is not None:
            self._server.close()
        self._cleanup_folder()

    def _cleanup_folder(self) -> None:
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = ""

    # ---- frames from the front (front_link.FrameSink) ------------------------------------------
    def on_call(self, start: CallStart) -> None:
        handler = self._handler(start.method, start.metadata)
        if handler is None:
            self._finish(start.call, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        call = _Call(FrontContext(start))
        if start.streaming_request:
            call.messages = asyncio.Queue()
        self._calls[start.call] = call
        call.task = asyncio.get_running_loop().create_task(self._run(start, handler, call))

    def on_message(self, call_id: int, payload: bytes | memoryview) -> None:
        self._queue(call_id, payload)

    def on_half_close(self, call_id: int) -> None:
        self._queue(call_id, None)  # the end of the request stream

    def _queue(self, call_id: int, payload: bytes | memoryview | None) -> None:
        call = self._calls.get(call_id)
        if call is not None and call.messages is not None:
            call.messages.put_nowait(payload)

    def on_cancel(self, call_id: int) -> None:
        call = self._calls.pop(call_id, None)
        if call is not None:
            call.context.cancelled_ = True
            if call.task is not None:
                call.task.cancel()

    def on_drained(self) -> None:
        self._drained.set()

    def on_out_result(self, result: OutResult) -> None:
        self.caller.on_result(result)

    def on_link_lost(self, exc: Exception | None) -> None:
        if not self.closed.is_set():
            if not self._drained.is_set():
                log.error("gRPC front link lost (%s): gRPC calls are no longer served", exc)
            self.closed.set()
        self.caller.close(f"the gRPC front is gone (link lost: {exc or 'closed'})")
        for call_id in list(self._calls):
            self.on_cancel(call_id)

    # ---- running calls -------------------------------------------------------------------------
    def _all_methods(self) -> list[tuple[str, grpc.RpcMethodHandler[Any, Any]]]:
        return [(m, h) for m, h in self._methods.items() if h is not None]

    def _handler(self, method: str, metadata: Metadata) -> grpc.RpcMethodHandler[Any, Any] | None:
        try:
            return self._methods[method]
        except KeyError:
            pass
        found = None
        for generic in self._generic:
            found = generic.service(_CallDetails(method, metadata))
            if found is not None:
                break
        self._methods[method] = found
        return found

    async def _run(
        self, start: CallStart, handler: grpc.RpcMethodHandler[Any, Any], call: _Call
    ) -> None:
        context = call.context
        try:
            if handler.request_streaming:
                request: Any = self._requests(call, handler.request_deserializer)
            else:
                request = _deserialize(handler.request_deserializer, start.payload)
            behavior: Any = _behavior(handler)
            if handler.response_streaming:
                async for response in behavior(request, context):
                    self._send(encode_message(start.call, _serialize(handler, response)))
                payload = None
            else:
                payload = _serialize(handler, await behavior(request, context))
        except grpc.aio.AbortError:
            code = context.code or grpc.StatusCode.UNKNOWN
            self._finish(start.call, code, context.details, trailing=context.trailing)
        except _BadMessage as exc:
            self._finish(start.call, grpc.StatusCode.INTERNAL, str(exc))
        except asyncio.CancelledError:
            if not context.cancelled_:  # this service is stopping: tell the client
                self._finish(start.call, grpc.StatusCode.CANCELLED, "the server is stopping")
            raise
        except Exception as exc:
            log.error("%s failed", start.method, exc_info=exc)
            self._finish(start.call, grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")
        else:
            code = context.code or grpc.StatusCode.OK
            self._finish(start.call, code, context.details, payload, context.trailing)
        finally:
            self._calls.pop(start.call, None)

    async def _requests(
        self, call: _Call, deserializer: Callable[[Any], Any] | None
    ) -> AsyncIterator[Any]:
        assert call.messages is not None
        while (message := await call.messages.get()) is not None:
            yield _deserialize(deserializer, message)

    def _send(self, frame: bytes) -> None:
        if self._link is not None:
            self._link.send(frame)

    def _finish(
        self,
        call_id: int,
        code: grpc.StatusCode,
        details: str = "",
        payload: bytes | None = None,
        trailing: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        self._send(encode_finish(call_id, code.value[0], details, payload, trailing))


def _behavior(handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
    """The handler's coroutine function (or async generator function) for its kind of RPC."""
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


class _BadMessage(Exception):
    """A message that did not deserialize or serialize (INTERNAL, as grpc.aio answers it)."""


def _deserialize(deserializer: Callable[[Any], Any] | None, payload: bytes | memoryview) -> Any:
    if deserializer is None:
        return payload
    try:
        return deserializer(payload)
    except Exception as exc:
        raise _BadMessage(f"Exception deserializing request: {exc}") from exc


def _serialize(handler: grpc.RpcMethodHandler[Any, Any], response: Any) -> bytes:
    if handler.response_serializer is None:
        return bytes(response)
    try:
        return bytes(handler.response_serializer(response))
    except Exception as exc:
        raise _BadMessage(f"Exception serializing response: {exc}") from exc
