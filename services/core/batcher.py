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

Under the rate limiter (``start(limits)``, rate_limiter.py) a due batch's free instance asks
for a grant (one instance at a time) and the batch is formed when it arrives, so requests that
came meanwhile join it; the fast path runs only on a grant given at once. Off: one None check.
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
from services.core.errors import (
    InternalError,
    InvalidArgument,
    ModelLoadError,
    QueueTimeout,
    Unavailable,
)
from services.core.rate_limiter import ModelLimits
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

    ``start()`` inside the running loop (``start(limits)`` under the rate limiter), ``submit``
    from any coroutine on that loop, ``close()`` to drain. ``instances`` batches run at once,
    each given a free instance index in ``range(instances)``.
    """

    def __init__(
        self,
        policy: BatchPolicy,
        run_batch: RunBatch[T, R],
        instances: int = 1,
        clock: Clock = MONOTONIC,
        run_now: RunNow[T, R] | None = None,
    ) -> None:
        super().__init__(policy.model, "batcher", clock, instances)
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
        #: the instance waiting for a rate limiter grant (None: none is)
        self._asking: int | None = None

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
            and (self._limits is None or self._limits.try_acquire(self._free[-1]))
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
        instance = self._free.pop()
        try:
            self._queue.check(ticket)
        except InvalidArgument:
            self._release(instance, executed=False)
            raise
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

    def _release(self, instance: int, *, executed: bool = True) -> None:
        """An instance ran its batch outside the driver: free it (and its grant), and wake the
        driver only when it has work (a closing batcher waits for its instances)."""
        self._free.append(instance)
        if self._limits is not None:
            self._limits.release(instance, executed=executed)
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
        if self._limits is not None:
            self._arm(self._schedule_limited(self._limits, now))
            return
        wake_at: int | None = None
        while self._free:
            items, wake_at = queue.next_batch(now, flush=self._closing)
            if items is None:
                break
            self._dispatch(items, now)
        else:
            wake_at = queue.next_deadline()
        self._arm(wake_at)

    def _schedule_limited(self, limits: ModelLimits, now: int) -> int | None:
        """``_schedule`` under the rate limiter: form the batch of each granted instance, then
        ask a grant for a free instance when a batch is due; when to look again."""
        queue = self._queue
        while True:
            while self._granted:
                instance = self._granted.pop()
                if instance == self._asking:
                    self._asking = None
                items, _ = queue.next_batch(now, flush=True)  # it was due when asked
                live = [t for t in items or () if not t.future.done()]
                for ticket in live:
                    ticket.start_ns = now
                if live:
                    self._spawn_batch(instance, live)
                else:  # its requests expired or gave up meanwhile
                    self._free.append(instance)
                    limits.release(instance, executed=False)
            if self._asking is not None and not queue:  # nothing left to ask for
                limits.withdraw(self._asking)
                self._free.append(self._asking)
                self._asking = None
            if self._asking is not None or not self._free:
                return queue.next_deadline()
            due, wake_at = queue.due(now, flush=self._closing)
            if not due:
                return wake_at
            self._asking = limits.first(self._free)
            self._free.remove(self._asking)
            limits.request(self._asking)  # a grant at once lands in self._granted
            if not self._granted:
                return queue.next_deadline()

    def _return_grants(self, limits: ModelLimits) -> None:
        """The driver stopped: withdraw the instance asking, give back unused grants."""
        if self._asking is not None:
            limits.withdraw(self._asking)
            self._free.append(self._asking)
            self._asking = None
        while self._granted:
            instance = self._granted.pop()
            self._free.append(instance)
            limits.release(instance, executed=False)

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
            if self._limits is None:
                self._free.append(instance)
            else:
                self._after_batch(self._limits, instance)
            self._poke()

    def _after_batch(self, limits: ModelLimits, instance: int) -> None:
        """Give a batch's grant back; with another batch due and no instance asking, ask again
        at once with this one, so it takes its turn among the instances already waiting."""
        now = self._clock.monotonic_ns()
        again = self._asking is None and self._queue.due(now, flush=self._closing)[0]
        if again:
            self._asking = instance
        else:
            self._free.append(instance)
        limits.release(instance, again=again)

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
        if self._limits is not None:
            self._return_grants(self._limits)


def resolve(future: asyncio.Future[R], outcome: R | BaseException) -> None:
    """Give a request's caller its outcome, unless it gave up waiting."""
    if future.done():  # the caller gave up (cancelled)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
