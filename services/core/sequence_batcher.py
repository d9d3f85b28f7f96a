"""Triton's sequence batcher: the scheduler of a stateful model (config ``sequence_batching``).

Data flow: ServedModel.infer ─▶ SequenceBatcher.submit (the request's correlation ID and START /
END flags, sequences.py) ─▶ the sequence's own queue ─▶ the driver task forms a batch on a free
instance from the oldest ready request of each of that instance's sequences ─▶ each request is
given its control tensors and its sequence's state (``SequenceSettings.model_inputs``) ─▶
``run_batch(instance, items)`` ─▶ the state outputs are kept for the sequence's next request and
taken out of the response ─▶ each caller's Future.

Rules, as in Triton:
* A sequence is bound to one instance from its START to its END, so a model that keeps state in
  the instance (a Python model keyed by ``correlation_id()``) sees all of it; each instance holds
  ``slots_per_instance`` sequences, and a sequence that finds every slot taken waits (its
  requests queue) until one ends or goes idle.
* Requests of one sequence run one at a time, in arrival order; a batch never holds two requests
  of the same sequence, and only requests with equal non-batch shapes.
* A request without START for a sequence that is not running is refused, as is one after its
  sequence's END; a sequence with nothing queued for ``max_sequence_idle_microseconds`` loses its
  slot and its state.
* A request whose caller gave up still runs (its sequence's state moves on); nothing queued is
  dropped on close.

Under the service's rate limiter (``start(limits)``, rate_limiter.py) an instance with a batch
due asks for a grant and forms its batch when the grant arrives (requests that came meanwhile
join it); until then it counts as busy.

Unlike Triton's direct strategy, a batch holds only the ready requests: no filler items with
READY false for idle slots (no runtime here keeps state by batch slot; implicit state and the
correlation ID are passed with each request).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, cast

import numpy as np

from services.core.batch_queue import Pending
from services.core.batcher import RunBatch, resolve
from services.core.clock import MONOTONIC, Clock
from services.core.errors import InternalError, InvalidArgument, Unavailable
from services.core.rate_limiter import ModelLimits
from services.core.requests import Array, InferRequest
from services.core.scheduler_driver import SchedulerDriver
from services.core.sequences import SequenceFlags, SequenceSettings, sequence_flags

log = logging.getLogger(__name__)


class HasOutputs(Protocol):
    outputs: dict[str, Array]


R = TypeVar("R", bound=HasOutputs)


@dataclass(slots=True, eq=False)
class _Ticket(Pending[InferRequest]):
    flags: SequenceFlags = field(kw_only=True)
    future: asyncio.Future[HasOutputs] = field(kw_only=True)


@dataclass(slots=True, eq=False)
class _Sequence:
    correlation_id: object
    #: requests waiting, oldest first
    queue: deque[_Ticket] = field(default_factory=deque)
    #: the instance holding its slot; None while it waits for one
    instance: int | None = None
    #: a request of it is executing
    running: bool = False
    #: takes requests without START (between its START and its END)
    open: bool = True
    #: the state outputs of its last request (without the batch dimension)
    state: dict[str, Array] | None = None
    #: clock time when it last had nothing queued or running
    idle_since_ns: int = 0


class SequenceBatcher(SchedulerDriver, Generic[R]):
    """One stateful model version's scheduler; the same interface as DynamicBatcher."""

    def __init__(
        self,
        settings: SequenceSettings,
        run_batch: RunBatch[InferRequest, R],
        instances: int = 1,
        clock: Clock = MONOTONIC,
    ) -> None:
        super().__init__(settings.model, "sequence-batcher", clock, instances)
        self.settings = settings
        self._run_batch = run_batch
        self._sequences: dict[object, _Sequence] = {}
        #: per instance: the sequences holding its slots
        self._bound: list[list[_Sequence]] = [[] for _ in range(instances)]
        #: per instance: executing a batch, or asking the rate limiter for a grant
        self._busy = [False] * instances
        #: sequences waiting for a slot, in START order
        self._backlog: deque[_Sequence] = deque()
        self._queued = 0

    @property
    def pending(self) -> int:
        """Requests queued and not yet executing (nv_inference_pending_request_count)."""
        return self._queued

    @property
    def active_sequences(self) -> int:
        """Sequences started and not ended or released (holding a slot or waiting for one)."""
        return len(self._sequences)

    async def submit(
        self,
        payload: InferRequest,
        *,
        batch_size: int,
        signature: Hashable,
        priority: int = 0,
        timeout_us: int = 0,
    ) -> R:
        """Queue one request of a sequence and wait for its result (priority and queue timeout
        do not apply to sequences)."""
        del priority, timeout_us
        wake = self._accepting()
        model = self.settings.model
        flags = sequence_flags(model, payload.parameters)
        if self.settings.batched and batch_size != 1:
            raise InvalidArgument(
                f"a request of a sequence to model '{model}' carries one item (batch size 1); "
                f"this one has {batch_size}"
            )
        self.settings.check_correlation_id(flags.correlation_id)
        cid = flags.correlation_id
        seq = self._sequences.get(cid)
        if not flags.start and (seq is None or not seq.open):
            raise InvalidArgument(
                f"inference request for sequence {cid!r} to model '{model}' must specify the "
                "START flag on the first request of the sequence"
                + ("" if seq is None else " (its previous request ended it)")
            )
        if seq is None:
            seq = self._sequences[cid] = _Sequence(cid)
            self._place(seq)
        seq.open = not flags.end
        now = self._clock.monotonic_ns()
        future: asyncio.Future[HasOutputs] = asyncio.get_running_loop().create_future()
        seq.queue.append(_Ticket(payload, 1, signature, 1, now, flags=flags, future=future))
        self._queued += 1
        wake.set()
        return await future  # type: ignore[return-value]

    def _place(self, seq: _Sequence) -> None:
        """Give a new sequence a slot on the least-loaded instance, or put it in the backlog."""
        load = [len(b) for b in self._bound]
        instance = min(range(len(load)), key=load.__getitem__)
        if load[instance] < self.settings.slots_per_instance:
            seq.instance = instance
            self._bound[instance].append(seq)
        else:
            self._backlog.append(seq)

    def _release(self, seq: _Sequence, why: str) -> None:
        """The sequence ended or went idle: free its slot for the oldest waiting sequence."""
        if self._sequences.get(seq.correlation_id) is seq:
            del self._sequences[seq.correlation_id]
        if why == "closing":
            log.info(
                "model %r: sequence %r ended by the model's unload",
                self.settings.model,
                seq.correlation_id,
            )
        elif why != "ended":
            log.warning(
                "model %r: sequence %r released (%s)", self.settings.model, seq.correlation_id, why
            )
        instance = seq.instance
        if instance is None:
            return
        self._bound[instance].remove(seq)
        if self._backlog:
            waiting = self._backlog.popleft()
            waiting.instance = instance
            self._bound[instance].append(waiting)

    # -- driver ------------------------------------------------------------------------------

    def _drained(self) -> bool:
        return not self._queued and not any(self._busy)

    def _schedule(self) -> None:
        """Release idle sequences, dispatch every batch that is due, arm the timer."""
        now = self._clock.monotonic_ns()
        wake_at: int | None = None
        idle_ns = self.settings.idle_ns
        for seq in [s for b in self._bound for s in b if not s.queue and not s.running]:
            if not seq.open:
                self._release(seq, "ended")
            elif self._closing or now - seq.idle_since_ns >= idle_ns:
                self._release(seq, "closing" if self._closing else f"idle for {idle_ns // 1000} µs")
            else:
                wake_at = _earliest(wake_at, seq.idle_since_ns + idle_ns)
        for instance, bound in enumerate(self._bound):
            if self._busy[instance]:
                continue
            ready = _ready(bound)
            if not ready:
                continue
            batch = self._batch_of(ready)
            due_at = self._due_at(bound, ready, len(batch))
            if self._closing or due_at <= now:
                if self._limits is None:
                    self._dispatch(instance, batch, now)
                else:  # the batch is formed when the grant arrives
                    self._busy[instance] = True
                    self._limits.request(instance)
            else:
                wake_at = _earliest(wake_at, due_at)
        if self._granted:
            self._run_granted(now)
        self._arm(wake_at)

    def _batch_of(self, ready: list[_Sequence]) -> list[_Sequence]:
        """The next batch of ready sequences: the oldest one's signature, max_batch_size."""
        signature = ready[0].queue[0].signature
        batch = [s for s in ready if s.queue[0].signature == signature]
        return batch[: self.settings.max_batch_size]

    def _run_granted(self, now: int) -> None:
        """Form and run the batch of each instance the rate limiter granted."""
        assert self._limits is not None
        while self._granted:
            instance = self._granted.pop()
            ready = _ready(self._bound[instance])
            if ready:
                self._dispatch(instance, self._batch_of(ready), now)
            else:
                self._busy[instance] = False
                self._limits.release(instance, executed=False)

    def _due_at(self, bound: list[_Sequence], ready_seqs: list[_Sequence], size: int) -> int:
        """When a batch of ``size`` (of the ``ready_seqs`` of an instance's ``bound``
        sequences) must run: 0 for at once."""
        s = self.settings
        ready = len(ready_seqs)
        # every slot of this instance taken by a ready sequence: waiting cannot add any
        if ready == len(bound) == s.slots_per_instance:
            return 0
        oldest_ns = ready_seqs[0].queue[0].enqueue_ns
        delay = s.max_queue_delay_ns
        if delay == 0 or size >= s.max_batch_size:
            return 0
        if s.strategy == "direct" and ready >= s.minimum_slot_utilization * s.slots_per_instance:
            return 0
        if s.preferred_batch_sizes and size >= s.preferred_batch_sizes[-1]:
            return 0
        if size in s.preferred_batch_sizes:
            return 0
        return oldest_ns + delay

    def _dispatch(self, instance: int, batch: list[_Sequence], now: int) -> None:
        tickets: list[_Ticket] = []
        for seq in batch:
            ticket = seq.queue.popleft()
            self._queued -= 1
            seq.running = True
            if ticket.flags.start:
                seq.state = None
            ticket.start_ns = now
            inputs = self.settings.model_inputs(ticket.flags, seq.state)
            ticket.payload = dataclasses.replace(
                ticket.payload, inputs={**ticket.payload.inputs, **inputs}
            )
            tickets.append(ticket)
        self._busy[instance] = True
        self._spawn(self._execute(instance, batch, tickets))

    async def _execute(self, instance: int, batch: list[_Sequence], tickets: list[_Ticket]) -> None:
        """Run one batch; keep each sequence's new state; every request gets an outcome."""
        model = self.settings.model
        try:
            try:
                results: Sequence[R | BaseException] = await self._run_batch(instance, tickets)
                if len(results) != len(tickets):
                    log.error(
                        "model %r: run_batch returned %d results for %d sequence requests",
                        model,
                        len(results),
                        len(tickets),
                    )
                    raise InternalError(f"model '{model}' failed to execute the batch")
            except BaseException as exc:
                fatal = not isinstance(exc, Exception)
                error = self._shutting_down() if fatal else exc
                for ticket in tickets:
                    resolve(ticket.future, error)
                if fatal:
                    raise
            else:
                for seq, ticket, result in zip(batch, tickets, results, strict=True):
                    if not isinstance(result, BaseException):
                        result = self._keep_state(seq, result)
                    resolve(ticket.future, cast("HasOutputs | BaseException", result))
        finally:
            now = self._clock.monotonic_ns()
            for seq in batch:
                seq.running = False
                seq.idle_since_ns = now
            self._busy[instance] = False
            if self._limits is not None:
                self._after_batch(self._limits, instance, now)
            self._poke()

    def _after_batch(self, limits: ModelLimits, instance: int, now: int) -> None:
        """Give a batch's grant back; with another batch due on the instance, ask again at
        once, so it takes its turn among the instances already waiting."""
        bound = self._bound[instance]
        ready = _ready(bound)
        again = bool(ready) and (
            self._closing or self._due_at(bound, ready, len(self._batch_of(ready))) <= now
        )
        self._busy[instance] = again
        limits.release(instance, again=again)

    def _keep_state(self, seq: _Sequence, result: R) -> R | BaseException:
        """Take the state outputs out of a request's result and keep them for its sequence."""
        names = self.settings.state_outputs
        if not names:
            return result
        outputs = result.outputs
        missing = [n for n in names if n not in outputs]
        if missing:
            return InternalError(
                f"model '{self.settings.model}' returned no state output {missing}"
            )
        batched = self.settings.batched
        seq.state = {n: np.array(outputs[n][0] if batched else outputs[n]) for n in names}
        result.outputs = {n: v for n, v in outputs.items() if n not in names}
        return result

    def _fail_queued(self, error: Unavailable) -> None:
        for seq in list(self._sequences.values()):
            while seq.queue:
                resolve(seq.queue.popleft().future, error)
        self._queued = 0
        limits = self._limits
        if limits is not None:  # withdraw the instances asking, give back unused grants
            for instance in range(len(self._busy)):
                if limits.withdraw(instance):
                    self._busy[instance] = False
            while self._granted:
                instance = self._granted.pop()
                self._busy[instance] = False
                limits.release(instance, executed=False)


def _ready(bound: list[_Sequence]) -> list[_Sequence]:
    """An instance's sequences with a request queued, the oldest request first."""
    return sorted((s for s in bound if s.queue), key=lambda s: s.queue[0].enqueue_ns)


def _earliest(current: int | None, candidate: int) -> int:
    return candidate if current is None else min(current, candidate)
