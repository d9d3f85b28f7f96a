"""Running inbound calls that arrive as frames (front_link.py), whichever link brought them.

A ``CallRunner`` runs the handlers of a ``grpc.aio``-style handler table for the calls of one
link: CALL starts a task with a ``FrontContext``, MESSAGE / HALF_CLOSE feed a streaming request,
CANCEL cancels the task, and every answer goes back on that link as MESSAGE and FINISH frames.
The link to grpc_front (native_front.py) has one, and so has every local link another process
opened to this service (local_links.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn

import grpc

from services.core.front_link import CallStart, Metadata, encode_finish, encode_message

log = logging.getLogger(__name__)

#: the handler for a method and the call's metadata (None: the method is not served)
Lookup = Callable[[str, Metadata], "grpc.RpcMethodHandler[Any, Any] | None"]


class FrontContext:
    """The subset of ``grpc.aio.ServicerContext`` a handler run from frames can use."""

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


class _Call:
    """One call in flight: its task, context, and (streaming requests) its message queue."""

    __slots__ = ("context", "messages", "task")

    def __init__(self, context: FrontContext) -> None:
        self.task: asyncio.Task[None] | None = None
        self.context = context
        self.messages: asyncio.Queue[bytes | memoryview | None] | None = None


class CallRunner:
    """The calls of one link: ``lookup`` finds their handlers, ``send`` queues frames back."""

    def __init__(self, lookup: Lookup, send: Callable[[bytes], None]) -> None:
        self._lookup = lookup
        self._send = send
        self._calls: dict[int, _Call] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def idle(self) -> None:
        """Return once no call is in flight."""
        await self._idle.wait()

    def on_call(self, start: CallStart) -> None:
        handler = self._lookup(start.method, start.metadata)
        if handler is None:
            self.finish(start.call, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        call = _Call(FrontContext(start))
        if start.streaming_request:
            call.messages = asyncio.Queue()
        self._calls[start.call] = call
        self._idle.clear()
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
        call = self._forget(call_id)
        if call is not None:
            call.context.cancelled_ = True
            if call.task is not None:
                call.task.cancel()

    def cancel_all(self) -> None:
        """The link is gone: every call in flight is cancelled (nobody is left to answer)."""
        for call_id in list(self._calls):
            self.on_cancel(call_id)

    def stop_all(self) -> None:
        """The service is stopping: calls still running are cancelled and told so."""
        for call in list(self._calls.values()):
            if call.task is not None:
                call.task.cancel()

    def _forget(self, call_id: int) -> _Call | None:
        call = self._calls.pop(call_id, None)
        if not self._calls:
            self._idle.set()
        return call

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
            self.finish(start.call, code, context.details, trailing=context.trailing)
        except _BadMessage as exc:
            self.finish(start.call, grpc.StatusCode.INTERNAL, str(exc))
        except asyncio.CancelledError:
            if not context.cancelled_:  # this service is stopping: tell the client
                self.finish(start.call, grpc.StatusCode.CANCELLED, "the server is stopping")
            raise
        except Exception as exc:
            log.error("%s failed", start.method, exc_info=exc)
            self.finish(start.call, grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")
        else:
            code = context.code or grpc.StatusCode.OK
            self.finish(start.call, code, context.details, payload, context.trailing)
        finally:
            self._forget(start.call)

    async def _requests(
        self, call: _Call, deserializer: Callable[[Any], Any] | None
    ) -> AsyncIterator[Any]:
        assert call.messages is not None
        while (message := await call.messages.get()) is not None:
            yield _deserialize(deserializer, message)

    def finish(
        self,
        call_id: int,
        code: grpc.StatusCode,
        details: str = "",
        payload: bytes | None = None,
        trailing: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        """End a call with a FINISH frame."""
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
