"""The per-model scheduler: queue requests, form batches, run them on free instances.

Data flow: ServedModel.infer ─▶ DynamicBatcher.submit (one Future per request) ─▶ BatchQueue
(batch_queue.py: priorities, timeouts, signatures, preferred sizes) ─▶ the driver task hands each
batch to ``run_batch(instance, items)`` on a free instance (at most ``instances`` at once) ─▶ each
request's Future gets its result (in arrival order with preserve_ordering).

Everything runs on one event loop: no locks, no task per request. The driver sleeps on an
asyncio.Event, woken by a submit, a finished batch, or a timer armed through the injectable Clock
(clock.py) for the next max_queue_delay or queue deadline.

A request that would be dispatched alone at once (no batching delay, the queue empty, an instance
free, no other callback ready in the loop, so none can join it) skips the driver: ``run_now``
runs it on the caller's thread when the model takes short batches inline, else it goes straight
to a batch task. At concurrency 1 that saves the driver's and the batch task's loop passes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from protos.gen.inference import model_config_pb2 as mc
from services.core.batch_queue import BatchPolicy, BatchQueue, Pending, QueuePolicy
from services.core.busy_poll import nothing_else_ready
from services.core.clock import MONOTONIC, Clock, MonotonicClock, TimerHandle
from services.core.errors import InternalError, ModelLoadError, QueueTimeout, Unavailable
from services.core.scheduler_driver import SchedulerDriver

__all__ = [
    "MONOTONIC",
    "BatchPolicy",
    "Clock",
    "DynamicBatcher",
    "MonotonicClock",
    "Pending",
    "QueuePolicy",
    "RunBatch",
    "RunNow",
    "TimerHandle",
    "batch_policy_from_config",
    "resolve",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: ``run_batch(instance, items)``: one result per item, in order; an exception instance in place
#: of a result fails only that item; raising fails the whole batch.
RunBatch = Callable[[int, Sequence[Pending[T]]], Awaitable[Sequence[R | BaseException]]]
#: ``run_now(instance, items)``: the same, run at once on the caller's thread when the runtime
#: chooses to (a short execution), else None without running anything.
RunNow = Callable[[int, Sequence[Pending[T]]], Sequence[R | BaseException] | None]


@dataclass(slots=True, eq=False)
class _Ticket(Pending[T], Generic[T, R]):
    """A Pending plus what only the driver needs: the caller's Future and the held outcome."""

    future: asyncio.Future[R] = field(kw_only=True)
    outcome: R | BaseException | None = field(default=None, kw_only=True)
    done: bool = field(default=False, kw_only=True)


def batch_policy_from_config(config: mc.ModelConfig) -> BatchPolicy:
    """Scheduler settings of a Triton ModelConfig; ModelLoadError when they are inconsistent."""

    def queue_policy(p: mc.ModelQueuePolicy) -> QueuePolicy:
        return QueuePolicy(
            max_queue_size=p.max_queue_size,
            default_timeout_us=p.default_timeout_microseconds,
            delay_on_timeout=p.timeout_action == mc.ModelQueuePolicy.DELAY,
            allow_timeout_override=p.allow_timeout_override,
        )

    try:
        if not config.HasField("dynamic_batching"):
            return BatchPolicy(
                model=config.name, max_batch_size=config.max_batch_size, dynamic=False
            )
        db = config.dynamic_batching
        return BatchPolicy(
            model=config.name,
            max_batch_size=config.max_batch_size,
            dynamic=True,
            preferred_batch_sizes=tuple(sorted(set(db.preferred_batch_size))),
            max_queue_delay_us=db.max_queue_delay_microseconds,
            preserve_ordering=db.preserve_ordering,
            priority_levels=db.priority_levels,
            default_priority_level=db.default_priority_level,
            default_queue_policy=queue_policy(db.default_queue_policy),
            priority_queue_policy={
                int(level): queue_policy(p) for level, p in db.priority_queue_policy.items()
            },
        )
    except ValueError as exc:
        raise ModelLoadError(f"model '{config.name}': dynamic_batching: {exc}") from exc


class DynamicBatcher(SchedulerDriver, Generic[T, R]):
    """Triton's dynamic batcher (or direct scheduler) for one model version.

    ``start()`` inside the running loop, ``submit`` from any coroutine on that loop, ``close()``
    to drain. ``instances`` batches run at once, each given a free instance index in
    ``range(instances)``.
    """

    def __init__(
        self,
        policy: BatchPolicy,
        run_batch: RunBatch[T, R],
        instances: int = 1,
        clock: Clock = MONOTONIC,
        run_now: RunNow[T, R] | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        super().__init__(policy.model, "batcher", clock)
        self.policy = policy
        self._run_batch = run_batch
        self._run_now = run_now
        #: a request that finds the queue empty and an instance free runs at once: the policy
        #: would dispatch it alone without waiting (no batching delay)
        self._immediate = not policy.dynamic or policy.max_queue_delay_us == 0
        self._queue: BatchQueue[_Ticket[T, R]] = BatchQueue(policy)
        self._instances = instances
        self._free: list[int] = list(range(instances - 1, -1, -1))
        self._ordered: deque[_Ticket[T, R]] | None = deque() if policy.preserve_ordering else None

    @property
    def pending(self) -> int:
        """Requests queued and not yet executing (nv_inference_pending_request_count)."""
        return len(self._queue)

    async def submit(
        self,
        payload: T,
        *,
        batch_size: int,
        signature: Hashable,
        priority: int = 0,
        timeout_us: int = 0,
    ) -> R:
        """Queue one request and wait for its result.

        ``batch_size`` is the request's dim-0 size (1 when the model has no batch dimension);
        ``priority`` 0 means the model's default level; ``timeout_us`` 0 means the level's
        default queue timeout. Raises Unavailable once closing, QueueFull when the level's queue
        is full, QueueTimeout when the request's queue timeout expires (REJECT), or whatever the
        batch execution raised.
        """
        wake = self._accepting()
        queue = self._queue
        now = self._clock.monotonic_ns()
        level = queue.level_of(priority)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if (
            self._immediate
            and self._free
            and not queue
            and not self._ordered
            and nothing_else_ready(loop)
        ):
            return await self._run_alone(
                _Ticket(payload, batch_size, signature, level, now, None, future=future)
            )
        ticket: _Ticket[T, R] = _Ticket(
            payload,
            batch_size,
            signature,
            level,
            now,
            queue.deadline_of(level, now, timeout_us) if self.policy.dynamic else None,
            future=future,
        )
        queue.push(ticket)

        if self._ordered is not None:
            self._ordered.append(ticket)
        wake.set()
        return await future

    async def _run_alone(self, ticket: _Ticket[T, R]) -> R:
        """Run a request that would be dispatched alone at once, without the driver's hop: on
        the caller's thread when ``run_now`` takes it, else in a batch task as usual."""
        self._queue.check(ticket)
        instance = self._free.pop()
        ticket.start_ns = ticket.enqueue_ns
        results = None
        if self._run_now is not None:
            try:
                results = self._run_now(instance, (ticket,))
            except BaseException:
                self._release(instance)
                raise
        if results is None:
            if self._ordered is not None:
                self._ordered.append(ticket)  # later requests wait for it (preserve_ordering)
            self._spawn_batch(instance, [ticket])
            return await ticket.future
        self._release(instance)
        if len(results) != 1:
            log.error(
                "model %r: run_now returned %d results for one request",
                self.policy.model,
                len(results),
            )
            raise InternalError(f"model '{self.policy.model}' failed to execute the batch")
        outcome = results[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _release(self, instance: int) -> None:
        """An instance ran its batch outside the driver: free it, and wake the driver only when
        it has work (a closing batcher waits for its instances)."""
        self._free.append(instance)
        if (self._queue or self._closing) and self._wake is not None:
            self._wake.set()

    # -- driver ------------------------------------------------------------------------------

    def _drained(self) -> bool:
        return not self._queue and len(self._free) == self._instances

    def _schedule(self) -> None:
        """Fail expired requests, dispatch every batch that is due, arm the timer."""
        queue = self._queue
        now = self._clock.monotonic_ns()
        expired = queue.expire(now)
        if expired:
            error = QueueTimeout(
                f"request timeout expired while queued for model '{self.policy.model}'"
            )
            for ticket in expired:
                self._finish(ticket, error)
        wake_at: int | None = None
        while self._free:
            items, wake_at = queue.next_batch(now, flush=self._closing)
            if items is None:
                break
            self._dispatch(items, now)
        else:
            wake_at = queue.next_deadline()
        self._arm(wake_at)

    def _dispatch(self, items: list[_Ticket[T, R]], now: int) -> None:
        items = [t for t in items if not t.future.done()]  # drop callers that gave up
        if not items:
            return
        for ticket in items:
            ticket.start_ns = now
        self._spawn_batch(self._free.pop(), items)

    def _spawn_batch(self, instance: int, items: list[_Ticket[T, R]]) -> None:
        self._spawn(self._execute(instance, items))

    async def _execute(self, instance: int, items: list[_Ticket[T, R]]) -> None:
        """Run one batch on ``instance``; every item gets an outcome, whatever happens."""

        try:
            try:
                results = await self._run_batch(instance, items)
                if len(results) != len(items):
                    log.error(
                        "model %r: run_batch returned %d results for a batch of %d requests",
                        self.policy.model,
                        len(results),
                        len(items),
                    )
                    raise InternalError(f"model '{self.policy.model}' failed to execute the batch")
            except BaseException as exc:
                fatal = not isinstance(exc, Exception)  # cancelled, or the process is exiting
                error = self._shutting_down() if fatal else exc
                for ticket in items:
                    self._finish(ticket, error)
                if fatal:
                    raise
            else:
                for ticket, result in zip(items, results, strict=True):
                    self._finish(ticket, result)
        finally:
            self._free.append(instance)
            self._poke()

    def _finish(self, ticket: _Ticket[T, R], outcome: R | BaseException) -> None:
        """Resolve the ticket's future, or hold the outcome until earlier requests resolved."""
        ordered = self._ordered
        if ordered is None:
            resolve(ticket.future, outcome)
            return
        ticket.outcome = outcome
        ticket.done = True
        while ordered and (ordered[0].done or ordered[0].future.done()):
            head = ordered.popleft()
            if head.done:
                resolve(head.future, cast("R | BaseException", head.outcome))
                head.outcome = None

    def _fail_queued(self, error: Unavailable) -> None:
        for ticket in self._queue.drain():
            self._finish(ticket, error)


def resolve(future: asyncio.Future[R], outcome: R | BaseException) -> None:
    """Give a request's caller its outcome, unless it gave up waiting."""
    if future.done():  # the caller gave up (cancelled)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
