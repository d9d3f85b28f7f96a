"""Dynamic batcher, part 2: the asyncio DynamicBatcher driver (batcher.py).

Time is a FakeClock (no wall-clock sleeps): the driver's timers fire only when a test advances
it, and ``settle()`` lets ready tasks run. The pure queue rules are in test_batch_queue.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.core.batcher import BatchPolicy, DynamicBatcher, Pending, QueuePolicy
from services.core.errors import (
    InternalError,
    InvalidArgument,
    QueueFull,
    QueueTimeout,
    Unavailable,
)

US = 1000  # nanoseconds per microsecond


# -- fakes -----------------------------------------------------------------------------------


@dataclass
class FakeTimer:
    when_ns: int
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeClock:
    """Fake monotonic clock: timers fire only when the test advances it."""

    now: int = 1_000_000
    timers: list[FakeTimer] = field(default_factory=list)

    def monotonic_ns(self) -> int:
        return self.now

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(when_ns, callback)
        self.timers.append(timer)
        return timer

    def advance(self, ns: int) -> None:
        self.now += ns
        due = [t for t in self.timers if t.when_ns <= self.now and not t.cancelled]
        self.timers = [t for t in self.timers if t not in due and not t.cancelled]
        for timer in due:
            timer.callback()


async def settle(rounds: int = 20) -> None:
    """Let every ready callback and task run (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Executor:
    """run_batch fake: records batches; with ``gated`` each batch waits for its own Event."""

    def __init__(self, gated: bool = False) -> None:
        self.gated = gated
        self.batches: list[tuple[int, list[str]]] = []
        self.gates: list[asyncio.Event] = []
        self.result: Callable[[Sequence[Pending[str]]], Sequence[object]] | None = None

    async def __call__(self, instance: int, items: Sequence[Pending[str]]) -> Sequence[object]:
        self.batches.append((instance, [it.payload for it in items]))
        if self.gated:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        if self.result is not None:
            return self.result(items)
        return [f"out:{it.payload}" for it in items]

    @property
    def payloads(self) -> list[list[str]]:
        return [p for _, p in self.batches]


BASE = BatchPolicy(model="m", max_batch_size=8, dynamic=True)


def policy(**changes: Any) -> BatchPolicy:
    return dataclasses.replace(BASE, **changes)


# -- DynamicBatcher: the asyncio driver ------------------------------------------------------


def make(
    run: Executor, clock: FakeClock | None = None, instances: int = 1, **kw: Any
) -> DynamicBatcher[str, object]:
    batcher: DynamicBatcher[str, object] = DynamicBatcher(
        policy(**kw), run, instances=instances, clock=clock or FakeClock()
    )
    batcher.start()
    return batcher


def submit(
    batcher: DynamicBatcher[str, object], name: str, priority: int = 0
) -> asyncio.Task[object]:
    return asyncio.create_task(batcher.submit(name, batch_size=1, signature="s", priority=priority))


async def test_delay_timer_forms_batch_on_fake_clock() -> None:
    clock, run = FakeClock(), Executor()
    batcher = make(run, clock, max_queue_delay_us=100)
    tasks = [submit(batcher, n) for n in "ab"]
    await settle()
    assert run.batches == [] and batcher.pending == 2
    clock.advance(99 * US)
    await settle()
    assert run.batches == []
    clock.advance(1 * US)
    await settle()
    assert run.payloads == [["a", "b"]]
    assert await asyncio.gather(*tasks) == ["out:a", "out:b"]
    assert batcher.pending == 0
    await batcher.close()


async def test_items_carry_enqueue_and_start_times() -> None:
    clock = FakeClock()
    seen: list[tuple[int, int]] = []

    async def run(instance: int, items: Sequence[Pending[str]]) -> list[str]:
        seen.extend((it.enqueue_ns, it.start_ns) for it in items)
        return ["ok"] * len(items)

    batcher: DynamicBatcher[str, str] = DynamicBatcher(
        policy(max_queue_delay_us=10), run, clock=clock
    )
    batcher.start()
    task = asyncio.create_task(batcher.submit("a", batch_size=1, signature="s"))
    await settle()
    clock.advance(10 * US)
    assert await task == "ok"
    assert seen == [(1_000_000, 1_000_000 + 10 * US)]
    await batcher.close()


async def test_queue_timeout_rejects_with_queue_timeout() -> None:
    clock, run = FakeClock(), Executor(gated=True)
    batcher = make(run, clock, default_queue_policy=QueuePolicy(default_timeout_us=100))
    busy = submit(batcher, "busy")
    await settle()
    waiting = submit(batcher, "waiting")
    await settle()
    clock.advance(100 * US)
    await settle()
    with pytest.raises(QueueTimeout, match="request timeout expired"):
        await waiting
    run.gates[0].set()
    assert await busy == "out:busy"
    assert run.payloads == [["busy"]]
    await batcher.close()


async def test_failed_batch_fails_every_request() -> None:
    run = Executor(gated=True)
    batcher = make(run)

    def boom(items: Sequence[Pending[str]]) -> Sequence[object]:
        raise RuntimeError("backend exploded")

    run.result = boom
    first = submit(batcher, "first")
    await settle()
    rest = [submit(batcher, n) for n in "abc"]
    await settle()
    run.gates[0].set()
    await settle()
    run.gates[1].set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert run.payloads == [["first"], ["a", "b", "c"]]
    assert all(isinstance(r, RuntimeError) for r in results)
    assert batcher.pending == 0
    await batcher.close()


async def test_wrong_result_count_fails_all_with_internal_error() -> None:
    run = Executor()
    run.result = lambda items: ["only one"]
    batcher = make(run)
    tasks = [submit(batcher, n) for n in "ab"]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, InternalError) for r in results)
    await batcher.close()


async def test_exception_instance_fails_only_its_item() -> None:
    run = Executor()
    run.result = lambda items: [
        InvalidArgument("bad b") if it.payload == "b" else it.payload for it in items
    ]
    batcher = make(run)
    tasks = [submit(batcher, n) for n in "abc"]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == "a" and results[2] == "c"
    assert isinstance(results[1], InvalidArgument)
    assert run.payloads == [["a", "b", "c"]]
    await batcher.close()


async def test_instances_run_concurrently_and_each_gets_a_free_index() -> None:
    run = Executor(gated=True)
    batcher = make(run, instances=3, max_batch_size=1)
    tasks = [submit(batcher, n) for n in "abcd"]
    await settle()
    assert sorted(i for i, _ in run.batches) == [0, 1, 2]  # three at once, the fourth waits
    assert batcher.pending == 1
    run.gates[1].set()
    await settle()
    assert len(run.batches) == 4
    assert run.batches[3][0] == run.batches[1][0]  # the freed instance runs the next batch
    for gate in run.gates:
        gate.set()
    assert await asyncio.gather(*tasks) == [f"out:{n}" for n in "abcd"]
    await batcher.close()


async def test_preserve_ordering_across_instances() -> None:
    run = Executor(gated=True)
    batcher = make(run, instances=2, max_batch_size=1, preserve_ordering=True)
    first, second = submit(batcher, "first"), submit(batcher, "second")
    await settle()
    run.gates[1].set()  # the later request finishes first ...
    await settle()
    assert not second.done()  # ... but is held until the earlier one is delivered
    run.gates[0].set()
    await settle()
    assert first.done() and second.done()
    assert [first.result(), second.result()] == ["out:first", "out:second"]
    await batcher.close()


async def test_without_preserve_ordering_results_arrive_as_finished() -> None:
    run = Executor(gated=True)
    batcher = make(run, instances=2, max_batch_size=1)
    first, second = submit(batcher, "first"), submit(batcher, "second")
    await settle()
    run.gates[1].set()
    await settle()
    assert second.done() and not first.done()
    run.gates[0].set()
    await first
    await batcher.close()


async def test_direct_mode_runs_each_request_alone() -> None:
    run = Executor(gated=True)
    batcher = make(run, dynamic=False, max_batch_size=8)
    tasks = [submit(batcher, n, priority=1) for n in "abc"]
    await settle()
    assert run.payloads == [["a"]]
    for _ in range(2):
        run.gates[-1].set()
        await settle()
    run.gates[-1].set()
    await asyncio.gather(*tasks)
    assert run.payloads == [["a"], ["b"], ["c"]]
    await batcher.close()


async def test_close_drains_then_rejects_new_requests() -> None:
    clock, run = FakeClock(), Executor(gated=True)
    batcher = make(run, clock, max_batch_size=2, max_queue_delay_us=10_000)
    tasks = [submit(batcher, n) for n in "abc"]
    await settle()
    assert run.payloads == [["a", "b"]]  # full batch; "c" waits for its delay
    closing = asyncio.create_task(batcher.close())
    await settle()
    with pytest.raises(Unavailable, match="'m'"):
        await batcher.submit("late", batch_size=1, signature="s")
    assert not closing.done()
    run.gates[0].set()
    await settle()
    assert run.payloads == [["a", "b"], ["c"]]  # drained without waiting for the delay
    run.gates[1].set()
    await closing
    assert await asyncio.gather(*tasks) == ["out:a", "out:b", "out:c"]


async def test_queue_full_through_submit() -> None:
    run = Executor(gated=True)
    batcher = make(run, max_batch_size=1, default_queue_policy=QueuePolicy(max_queue_size=1))
    running = submit(batcher, "running")
    await settle()
    queued = submit(batcher, "queued")
    await settle()
    with pytest.raises(QueueFull, match="max_queue_size 1"):
        await batcher.submit("rejected", batch_size=1, signature="s")
    for _ in range(2):
        run.gates[-1].set()
        await settle()
    assert [await running, await queued] == ["out:running", "out:queued"]
    await batcher.close()


async def test_cancelled_driver_fails_waiting_and_running_requests() -> None:
    run = Executor(gated=True)
    batcher = make(run, max_batch_size=1)
    tasks = [submit(batcher, n) for n in "ab"]
    await settle()
    driver = next(t for t in asyncio.all_tasks() if t.get_name() == "batcher:m")
    driver.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    with pytest.raises(Unavailable):
        await batcher.submit("late", batch_size=1, signature="s")
    await batcher.close()  # after a cancelled driver: returns quietly


async def test_caller_that_gave_up_is_not_executed_and_does_not_block_ordering() -> None:
    run = Executor(gated=True)
    batcher = make(run, max_batch_size=1, preserve_ordering=True)
    first = submit(batcher, "first")
    await settle()
    gave_up, last = submit(batcher, "gave-up"), submit(batcher, "last")
    await settle()
    gave_up.cancel()
    run.gates[0].set()
    await settle()
    run.gates[1].set()
    assert [await first, await last] == ["out:first", "out:last"]
    assert run.payloads == [["first"], ["last"]]
    await batcher.close()


async def test_close_before_start_is_a_no_op() -> None:
    batcher: DynamicBatcher[str, object] = DynamicBatcher(BASE, Executor())
    await batcher.close()
    with pytest.raises(Unavailable):
        await batcher.submit("x", batch_size=1, signature="s")
