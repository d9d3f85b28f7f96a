"""Decoupled models: one request, any number of responses, sent whenever the model likes.

Triton's decoupled transaction policy (``model_transaction_policy { decoupled: true }``): the
model answers through a response sender, from any thread and possibly after ``execute``
returned; its last response carries the FINAL flag, with or without outputs. Clients reach such
models over ModelStreamInfer only (a unary call could carry one response at most).

``ResponseStream`` bridges the two sides of one request: the runtime's sender calls ``send``
from its thread; the transport awaits ``get`` on the event loop. When the client goes away, the
transport marks the stream cancelled, which the model can poll (``is_cancelled``).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from services.core.errors import ServingError
from services.core.requests import Array


class StreamClosed(Exception):
    """A response was sent after the one flagged FINAL."""


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One response: outputs, or the error failing the request; ``final`` ends the request."""

    outputs: dict[str, Array] | None
    error: ServingError | None
    final: bool


class ResponseStream:
    """The responses of one request to a decoupled model. Create on the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._lock = threading.Lock()
        self._final_sent = False
        self._cancelled = False

    def send(self, item: StreamItem) -> None:
        """Queue a response (any thread). Raises StreamClosed after the FINAL one."""
        with self._lock:
            if self._final_sent:
                raise StreamClosed(
                    "the response flagged FINAL was sent already; nothing may follow"
                )
            self._final_sent = item.final
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> StreamItem:
        """The next response, in the order sent."""
        return await self._queue.get()

    @property
    def final_sent(self) -> bool:
        return self._final_sent

    def cancel(self) -> None:
        """The caller stopped listening (cancelled, or its stream closed)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled
