"""What both per-model schedulers share (batcher.py's DynamicBatcher, sequence_batcher.py's
SequenceBatcher): one driver task on the event loop, woken by an asyncio.Event (a submit, a
finished batch, a rate-limiter grant, or the WakeTimer), that runs ``_schedule`` until the
scheduler is closing and idle; batch tasks tracked so an aborted driver cancels them; ``close``
draining everything; with the service's rate limiter (rate_limiter.py, given to ``start``) the
grants that arrived, for ``_schedule`` to form their batches."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any

from services.core.clock import Clock, WakeTimer
from services.core.errors import Unavailable
from services.core.rate_limiter import ModelLimits


class SchedulerDriver(ABC):
    def __init__(self, model: str, kind: str, clock: Clock, instances: int) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self._model_name = model
        self._kind = kind
        self._clock = clock
        self._instance_count = instances
        #: the rate limiter's view of the instances (None: not limited, the default)
        self._limits: ModelLimits | None = None
        #: instances granted by the rate limiter whose batch is not formed yet
        self._granted: list[int] = []
        self._running: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task[None] | None = None
        self._timer = WakeTimer(clock)
        self._closing = False

    def start(self, limits: ModelLimits | None = None) -> None:
        """Start the driver task; call inside the running loop, once. With ``limits`` an
        instance runs a batch only once the rate limiter grants it; ``close`` unregisters."""
        if self._driver is not None:
            raise RuntimeError(f"{self._kind} of model '{self._model_name}' already started")
        if limits is not None:
            if len(limits) != self._instance_count:
                raise ValueError(
                    f"{len(limits)} rate limiter instances for {self._instance_count} instances"
                )
            limits.bind(self._on_grant)
            self._limits = limits
        self._wake = asyncio.Event()
        self._driver = asyncio.get_running_loop().create_task(
            self._drive(), name=f"{self._kind}:{self._model_name}"
        )

    def _accepting(self) -> asyncio.Event:
        """The driver's wake event; Unavailable when not started, closing or stopped."""
        driver, wake = self._driver, self._wake
        if self._closing or driver is None or wake is None or driver.done():
            raise Unavailable(f"model '{self._model_name}' is not accepting requests")
        return wake

    def _poke(self) -> None:
        """Wake the driver (it looks at everything again)."""
        if self._wake is not None:
            self._wake.set()

    def _on_grant(self, instance: int) -> None:
        """The rate limiter granted ``instance``: the driver forms its batch on its next pass."""
        self._granted.append(instance)
        self._poke()

    async def close(self) -> None:
        """Stop accepting requests, finish everything queued or running, stop the driver.

        Safe to call before ``start``, twice, or after the driver was cancelled.
        """
        self._closing = True
        driver = self._driver
        if driver is None:
            return
        self._poke()
        await asyncio.wait([driver])  # neither the driver's end nor its cancel reaches us
        if self._limits is not None:
            self._limits.close()  # nothing runs any more: unregister
        if not driver.cancelled() and (crash := driver.exception()) is not None:
            raise crash

    async def _drive(self) -> None:
        wake = self._wake
        assert wake is not None
        try:
            while True:
                wake.clear()
                self._schedule()
                if self._closing and self._drained():
                    return
                await wake.wait()
        finally:
            self._timer.cancel()
            await self._abort()

    def _arm(self, wake_at: int | None) -> None:
        """Wake the driver at ``wake_at`` (clock ns; None: no timer needed)."""
        if self._wake is not None:
            self._timer.arm(wake_at, self._wake)

    def _spawn(self, batch: Coroutine[Any, Any, None]) -> None:
        """Run one batch as a task the driver's abort can cancel."""
        task = asyncio.get_running_loop().create_task(batch)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _shutting_down(self) -> Unavailable:
        return Unavailable(f"model '{self._model_name}' is shutting down")

    async def _abort(self) -> None:
        """Driver stopped (cancelled or crashed): fail what waits, cancel and await what runs."""
        self._closing = True
        self._fail_queued(self._shutting_down())
        running = list(self._running)
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    @abstractmethod
    def _schedule(self) -> None:
        """Dispatch every batch that is due and arm the timer for the next decision."""

    @abstractmethod
    def _drained(self) -> bool:
        """Nothing queued and nothing running."""

    @abstractmethod
    def _fail_queued(self, error: Unavailable) -> None:
        """Fail every request still queued with ``error``."""
