"""An event loop that polls its sockets for a short while before it sleeps (busy polling).

At low load every request reaches a sleeping service: the front's write has to wake the event
loop's thread (on a virtual machine, an idle vCPU is halted and woken by an interrupt), and the
Python code then runs with cold caches. Measured on this project's 2-core VM, a loop that keeps
polling for 500 µs after it ran out of work answered `simple` at concurrency 1 in 0.28 ms p50
instead of 0.61 ms, and `mlp` in 0.68 ms instead of 0.95 ms, with the same throughput under load.

The price is CPU: after each burst of work the loop spins for up to ``window_us`` before it
blocks. An idle service spins once per wake-up (a timer) and then sleeps; a service answering
one request at a time keeps a core busy. Under load the loop always has work and never spins.
While work of this loop runs in executor threads (a model's batch on a worker thread) the loop
does not spin: that core belongs to the work it waits for.

``event_loop(window_us)`` makes the loop; ``window_us`` 0 gives asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar, TypeVarTuple

T = TypeVar("T")

_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)
Ts = TypeVarTuple("Ts")

#: the environment variable that sets the default window of every service (ServerSettings)
ENV = "MESHSERVE_BUSY_POLL_US"


class BusyPollSelector(selectors.DefaultSelector):
    """The platform's selector (epoll on Linux) whose blocking ``select`` first polls for up to
    ``window_s``; while ``held()`` is true it blocks at once."""

    def __init__(self, window_s: float, held: Callable[[], bool]) -> None:
        super().__init__()
        self.window_s = window_s
        self._held = held
        #: polls made while spinning (tests read it)
        self.polls = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if (timeout is not None and timeout <= 0) or self.window_s <= 0 or self._held():
            return super().select(timeout)
        start = time.monotonic()
        spin_until = start + (self.window_s if timeout is None else min(self.window_s, timeout))
        now = start
        while now < spin_until:
            self.polls += 1
            ready = super().select(0)
            if ready:
                return ready
            _yield()  # threads ready to run on this core go first: the poll takes idle time only
            now = time.monotonic()
        if timeout is None:
            return super().select(None)
        return super().select(max(0.0, timeout - (now - start)))


class BusyPollEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop on a ``BusyPollSelector``; it does not poll while executor work
    it started (``run_in_executor``, ``asyncio.to_thread``) is running."""

    def __init__(self, window_us: int) -> None:
        self._in_threads = 0
        self.busy_selector = BusyPollSelector(window_us / 1e6, self._has_thread_work)
        super().__init__(self.busy_selector)

    def _has_thread_work(self) -> bool:
        return self._in_threads > 0

    def run_in_executor(
        self, executor: Executor | None, func: Callable[[*Ts], T], *args: *Ts
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self._in_threads += 1
        future.add_done_callback(self._thread_work_done)
        return future

    def _thread_work_done(self, _: asyncio.Future[Any]) -> None:
        self._in_threads -= 1


def nothing_else_ready(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether no other callback waits to run in this iteration of ``loop``: the code running
    now is all the loop has to do (a lone request at low load, not one of a burst of calls whose
    tasks are all ready). asyncio keeps them in the loop's ``_ready`` deque; a loop without one
    always says no."""
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


def event_loop(window_us: int) -> asyncio.AbstractEventLoop:
    """A new event loop that busy-polls for ``window_us`` (0: asyncio's default loop)."""
    if window_us < 0:
        raise ValueError(f"busy-poll window must be 0 or more microseconds, got {window_us}")
    if window_us == 0:
        return asyncio.new_event_loop()
    return BusyPollEventLoop(window_us)
