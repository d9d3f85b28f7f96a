"""The batcher's time: monotonic nanoseconds and timers on them, precise to microseconds.

``Clock`` is what DynamicBatcher (batcher.py) asks for the time and arms its max_queue_delay and
queue-deadline timers on; tests pass a fake one that fires timers only when they advance it.
``MONOTONIC`` is the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["MONOTONIC", "Clock", "MonotonicClock", "TimerHandle"]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time in nanoseconds, and a timer on that time (tests pass a fake one)."""

    def monotonic_ns(self) -> int: ...

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback`` on the running loop once ``monotonic_ns() >= when_ns``."""
        ...


#: asyncio rounds selector timeouts up to whole milliseconds, so a 100 µs call_later fires after
#: ~1 ms. The last stretch before a deadline is waited by re-queuing with call_soon instead: the
#: loop keeps polling sockets (new requests still arrive) and the timer fires within microseconds.
_COARSE_MARGIN_NS = 1_500_000


class _PreciseTimer:
    """A timer on the running loop accurate to microseconds (see _COARSE_MARGIN_NS)."""

    __slots__ = ("_callback", "_cancelled", "_handle", "_loop", "_when_ns")

    def __init__(self, when_ns: int, callback: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._when_ns = when_ns
        self._callback = callback
        self._cancelled = False
        self._handle: asyncio.Handle | None = None
        self._arm()

    def _arm(self) -> None:
        remaining = self._when_ns - time.monotonic_ns()
        if remaining > _COARSE_MARGIN_NS:
            self._handle = self._loop.call_later((remaining - _COARSE_MARGIN_NS) / 1e9, self._tick)
        else:
            self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        if self._cancelled:
            return
        if time.monotonic_ns() >= self._when_ns:
            self._callback()
        else:
            self._arm()

    def cancel(self) -> None:
        self._cancelled = True
        if self._handle is not None:
            self._handle.cancel()


class MonotonicClock:
    """time.monotonic_ns with microsecond-accurate timers on the running event loop."""

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> TimerHandle:
        return _PreciseTimer(when_ns, callback)


MONOTONIC: Clock = MonotonicClock()


class WakeTimer:
    """A scheduler's one timer: sets ``event`` once the clock reaches the time last armed.

    Arming again at the same time keeps the timer; another time (or None) replaces it. A fired
    timer is forgotten, so the same time arms it again (timers may fire early).
    """

    __slots__ = ("_at", "_clock", "_event", "_handle")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._event: asyncio.Event | None = None
        self._handle: TimerHandle | None = None
        self._at: int | None = None

    def arm(self, wake_at: int | None, event: asyncio.Event) -> None:
        if wake_at == self._at:
            return
        self.cancel()
        if wake_at is not None:
            self._event = event
            self._handle = self._clock.call_at(wake_at, self._fire)
            self._at = wake_at

    def _fire(self) -> None:
        self._handle = None
        self._at = None
        if self._event is not None:
            self._event.set()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._at = None
