"""The pure scheduling core of the dynamic batcher: which queued requests form the next batch.

Data flow: ServedModel.infer ─▶ DynamicBatcher.submit ─▶ BatchQueue.push ... the batcher's driver
asks ``expire(now)`` for requests whose queue timeout ran out and ``next_batch(now)`` for the next
batch to run on a free instance ─▶ run_batch.

No asyncio and no clock here: every decision takes ``now_ns`` (monotonic nanoseconds) as an
argument, so tests drive it deterministically. Semantics follow Triton's dynamic batcher:

* Order: priority level 1 first; within a level, arrival order; a request whose timeout expired
  under ``timeout_action: DELAY`` moves behind every non-expired request of its level.
* A batch is a run of consecutive requests (in that order) with the signature of the first one
  (equal non-batch shapes); a different signature ends the batch, as in Triton.
* It is sent when it reaches max_batch_size, cannot grow (the next request has another signature
  or would overflow max_batch_size), reaches a preferred size (the largest one reachable), grows to
  the largest preferred size, or when its oldest request has waited max_queue_delay. Otherwise the
  caller is told when to look again.
* Without batching (no ``dynamic_batching``, or max_batch_size 0) each request is its own batch.

Removal is lazy (a state flag per item, dead entries skipped and dropped from the deque fronts),
so every request costs O(1) amortized plus a heap push when it has a deadline.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from services.core.errors import InvalidArgument, QueueFull

T = TypeVar("T")

# Item states (Pending.state).
QUEUED = 0  # waiting in its level's main queue
DELAYED = 1  # timeout expired under DELAY: waiting in its level's delayed queue
TAKEN = 2  # handed out in a batch
EXPIRED = 3  # timeout expired under REJECT: handed out by expire()


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy for one priority level."""

    #: most requests waiting at this level; 0 = unbounded
    max_queue_size: int = 0
    #: queue timeout of a request at this level in microseconds; 0 = none
    default_timeout_us: int = 0
    #: timeout_action DELAY (True) or REJECT (False)
    delay_on_timeout: bool = False
    #: a request may ask for a shorter timeout than the default
    allow_timeout_override: bool = False


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """Everything the scheduler needs from a model's config (see batch_policy_from_config)."""

    #: model name, for error messages
    model: str
    #: Triton's max_batch_size; 0 = the model has no batch dimension
    max_batch_size: int
    #: the config has dynamic_batching; False = "direct" mode, one request per execution
    dynamic: bool
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    #: deliver responses in arrival order
    preserve_ordering: bool = False
    #: number of priority levels; 0 = one level and request priorities are ignored
    priority_levels: int = 0
    #: level of a request that asks for priority 0 (or an out-of-range one)
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    #: per-level overrides of default_queue_policy, keyed by level (1 = highest)
    priority_queue_policy: Mapping[int, QueuePolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(
                f"max_queue_delay_microseconds must be >= 0, got {self.max_queue_delay_us}"
            )
        for size in self.preferred_batch_sizes:
            if not 0 < size <= max(self.max_batch_size, 1):
                raise ValueError(
                    f"preferred_batch_size {size} must be in [1, max_batch_size "
                    f"{self.max_batch_size}]"
                )
        if self.priority_levels < 0:
            raise ValueError(f"priority_levels must be >= 0, got {self.priority_levels}")
        if self.priority_levels and not 1 <= self.default_priority_level <= self.priority_levels:
            raise ValueError(
                f"default_priority_level {self.default_priority_level} must be in "
                f"[1, priority_levels {self.priority_levels}]"
            )
        for level in self.priority_queue_policy:
            if not 1 <= level <= max(self.priority_levels, 1):
                raise ValueError(
                    f"priority_queue_policy level {level} must be in "
                    f"[1, priority_levels {self.priority_levels}]"
                )

    @property
    def batching(self) -> bool:
        """Whether requests may share an execution."""
        return self.dynamic and self.max_batch_size > 0


@dataclass(slots=True, eq=False)
class Pending(Generic[T]):
    """One queued request as the scheduler and the batch executor see it."""

    payload: T
    #: size of the request's dim 0 (1 when the model has no batch dimension)
    batch_size: int
    #: requests batch together only when their signatures are equal (non-batch shapes)
    signature: Hashable
    #: priority level served (1 = highest; 1 when the model has no levels)
    priority: int
    #: clock time when the request was queued
    enqueue_ns: int
    #: clock time when its queue timeout expires; None = never
    deadline_ns: int | None = None
    #: clock time when its batch was handed to an instance (0 while queued)
    start_ns: int = 0
    #: QUEUED / DELAYED / TAKEN / EXPIRED (owned by BatchQueue)
    state: int = QUEUED


P = TypeVar("P", bound=Pending[Any])


class _Level(Generic[P]):
    __slots__ = ("delayed", "live", "main", "policy")

    def __init__(self, policy: QueuePolicy) -> None:
        self.policy = policy
        self.main: deque[P] = deque()
        self.delayed: deque[P] = deque()
        self.live = 0


class BatchQueue(Generic[P]):
    """Priority levels of FIFO queues plus the batch-forming rule. Not thread-safe (one loop)."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._batching = policy.batching
        self._max_batch = policy.max_batch_size
        self._preferred = frozenset(policy.preferred_batch_sizes)
        self._max_preferred = max(policy.preferred_batch_sizes, default=0)
        self._delay_ns = policy.max_queue_delay_us * 1000
        if not policy.dynamic:
            # Direct mode: one FIFO, no queue policy, priorities ignored.
            self._levels: list[_Level[P]] = [_Level(QueuePolicy())]
        else:
            count = max(policy.priority_levels, 1)
            self._levels = [
                _Level(policy.priority_queue_policy.get(n, policy.default_queue_policy))
                for n in range(1, count + 1)
            ]
        has_levels = policy.dynamic and policy.priority_levels > 0
        self._default_level = policy.default_priority_level if has_levels else 1
        self._deadlines: list[tuple[int, int, P]] = []
        self._seq = 0
        self._live = 0

    def __len__(self) -> int:
        """Requests waiting (queued or delayed), not yet handed out."""
        return self._live

    # -- admission ---------------------------------------------------------------------------

    def level_of(self, priority: int) -> int:
        """Level that serves a request asking for ``priority`` (0 or out of range: the default)."""
        if 1 <= priority <= len(self._levels):
            return priority
        return self._default_level

    def deadline_of(self, level: int, enqueue_ns: int, timeout_us: int) -> int | None:
        """Queue deadline of a request at ``level`` that asked for ``timeout_us`` (0 = none).

        The level's default timeout applies; the request's own applies only when the level
        allows overrides, and only to shorten it (a default of 0 means no limit, so any
        requested timeout is shorter).
        """
        policy = self._levels[level - 1].policy
        effective = policy.default_timeout_us
        shorter = timeout_us > 0 and (effective == 0 or timeout_us < effective)
        if policy.allow_timeout_override and shorter:
            effective = timeout_us
        return enqueue_ns + effective * 1000 if effective > 0 else None

    def check(self, item: P) -> None:
        """InvalidArgument when ``item`` can never be part of a batch (its size)."""
        if self._batching and not 0 < item.batch_size <= self._max_batch:
            raise InvalidArgument(
                f"model '{self.policy.model}': batch size {item.batch_size} is outside "
                f"[1, max_batch_size {self._max_batch}]"
            )

    def push(self, item: P) -> None:
        """Queue ``item`` at level ``item.priority``; QueueFull when that level is full."""
        self.check(item)
        level = self._levels[item.priority - 1]
        limit = level.policy.max_queue_size
        if limit and level.live >= limit:
            where = f" at priority level {item.priority}" if len(self._levels) > 1 else ""
            raise QueueFull(
                f"model '{self.policy.model}': exceeds maximum queue size "
                f"(max_queue_size {limit}{where})"
            )
        item.state = QUEUED
        level.main.append(item)
        level.live += 1
        self._live += 1
        if item.deadline_ns is not None:
            self._seq += 1
            heapq.heappush(self._deadlines, (item.deadline_ns, self._seq, item))

    # -- timeouts ----------------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """Earliest queue deadline among requests still waiting (not yet expired)."""
        heap = self._deadlines
        while heap and heap[0][2].state != QUEUED:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now_ns: int) -> list[P]:
        """Apply queue timeouts up to ``now_ns``.

        DELAY items move behind their level's non-expired ones; REJECT items leave the queue and
        are returned (state EXPIRED) for the caller to fail.
        """
        rejected: list[P] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now_ns:
            item = heapq.heappop(heap)[2]
            if item.state != QUEUED:
                continue
            level = self._levels[item.priority - 1]
            if level.policy.delay_on_timeout:
                item.state = DELAYED
                level.delayed.append(item)
            else:
                item.state = EXPIRED
                level.live -= 1
                self._live -= 1
                rejected.append(item)
        if len(heap) > 2 * self._live + 64:
            # Many taken items still sit in the heap: rebuild it from the live ones.
            self._deadlines = [e for e in heap if e[2].state == QUEUED]
            heapq.heapify(self._deadlines)
        return rejected

    # -- batch forming -----------------------------------------------------------------------

    def _live_items(self) -> Iterator[P]:
        """Waiting items in service order; drops dead entries from the front of each deque."""
        for level in self._levels:
            if not level.live:
                continue
            for dq, state in ((level.main, QUEUED), (level.delayed, DELAYED)):
                while dq and dq[0].state != state:
                    dq.popleft()
                for item in dq:
                    if item.state == state:
                        yield item

    def next_batch(
        self, now_ns: int, *, flush: bool = False, take: bool = True
    ) -> tuple[list[P] | None, int | None]:
        """The batch to run now, or (None, when to look again).

        Call ``expire(now_ns)`` first. The returned items leave the queue (state TAKEN) unless
        ``take`` is False (``due``). With ``flush`` (draining), no batch waits for
        max_queue_delay. The wake time returned with None is the earlier of the batch's delay
        and the next queue deadline (None: nothing to wait for). The wake time returned with a
        batch is None: call again.
        """
        if not self._live:
            return None, None
        items: list[P] = []
        if not self._batching:
            items.append(next(self._live_items()))
            return self._take(items) if take else items, None
        total = 0
        best = 0  # number of leading items that make the best preferred size
        can_grow = True
        oldest = now_ns
        signature: Hashable = None
        for item in self._live_items():
            size = item.batch_size
            if not items:
                signature = item.signature
            elif item.signature != signature:
                can_grow = False
                break
            if best and total + size > self._max_preferred:
                break
            if total + size > self._max_batch:
                can_grow = False
                break
            items.append(item)
            total += size
            oldest = min(oldest, item.enqueue_ns)
            if total in self._preferred:
                best = len(items)
            if total == self._max_batch:
                can_grow = False
                break
        delay_exceeded = flush or now_ns - oldest >= self._delay_ns
        if best and not delay_exceeded:
            return self._take(items[:best]) if take else items[:best], None
        if not can_grow or delay_exceeded or (self._max_preferred and total >= self._max_preferred):
            return self._take(items) if take else items, None
        wake = oldest + self._delay_ns
        deadline = self.next_deadline()
        return None, wake if deadline is None else min(wake, deadline)

    def due(self, now_ns: int, *, flush: bool = False) -> tuple[bool, int | None]:
        """Whether ``next_batch`` would return a batch now (nothing leaves the queue), else
        when to look again (the rate limiter asks for a grant first, then forms the batch)."""
        items, wake = self.next_batch(now_ns, flush=flush, take=False)
        return items is not None, wake

    def _take(self, items: list[P]) -> list[P]:
        for item in items:
            item.state = TAKEN
            self._levels[item.priority - 1].live -= 1
        self._live -= len(items)
        return items

    def drain(self) -> list[P]:
        """Remove and return every waiting item (shutdown without executing them)."""
        items = list(self._live_items())
        for item in items:
            item.state = EXPIRED
        for level in self._levels:
            level.main.clear()
            level.delayed.clear()
            level.live = 0
        self._live = 0
        self._deadlines.clear()
        return items
