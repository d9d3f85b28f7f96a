"""The schedulers under the rate limiter (batcher.py, sequence_batcher.py), on a FakeClock: a
batch waits for its grant, is formed when the grant arrives, and every way out (failure,
cancellation, timeout, close, abort) gives the grant back. The limiter alone:
test_rate_limiter.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.core.batcher import DynamicBatcher, QueuePolicy
from services.core.errors import InvalidArgument, QueueTimeout, Unavailable
from services.core.rate_limiter import ModelLimits, RateLimiter
from services.core.requests import InferRequest
from services.core.sequence_batcher import SequenceBatcher
from tests.unit.test_batcher import Executor, FakeClock, policy, settle
from tests.unit.test_rate_limiter import Grants, config, limited, r
from tests.unit.test_sequence_batcher import Model, Result, send
from tests.unit.test_sequence_batcher import settings as sequence_settings

US = 1000


# -- DynamicBatcher under the limiter --------------------------------------------------------


def limited_batcher(
    limiter: RateLimiter, run: Executor, clock: FakeClock, **kw: object
) -> tuple[DynamicBatcher[str, object], ModelLimits]:
    """Model "m" (one instance needing R:1) on a DynamicBatcher, and its limits."""
    batcher: DynamicBatcher[str, object] = DynamicBatcher(
        policy(model="m", **kw),  # type: ignore[arg-type]
        run,
        clock=clock,
        run_now=lambda instance, items: [f"now:{it.payload}" for it in items],
    )
    limits = limiter.register(config("m", limited(r("R", 1))))
    batcher.start(limits)
    return batcher, limits


def submit(batcher: DynamicBatcher[str, object], name: str) -> asyncio.Task[object]:
    return asyncio.create_task(batcher.submit(name, batch_size=1, signature="s"))


async def test_a_batch_waits_for_its_grant_and_is_formed_when_it_arrives() -> None:
    limiter, clock = RateLimiter(), FakeClock()
    other = limiter.register(config("other", limited(r("R", 1))))
    run = Executor()
    batcher, _ = limited_batcher(limiter, run, clock)
    assert other.try_acquire(0)
    first = submit(batcher, "a")  # no fast path: R is held
    await settle()
    later = [submit(batcher, n) for n in "bc"]
    await settle()
    assert run.batches == [] and batcher.pending == 3
    other.release(0)
    assert await asyncio.gather(first, *later) == ["out:a", "out:b", "out:c"]
    assert run.payloads == [["a", "b", "c"]]  # one batch: formed at grant time
    assert limiter.in_use((0, "r")) == 0
    # with R free, a lone request takes the fast path (run_now) and gives R back
    assert await submit(batcher, "d") == "now:d"
    assert limiter.in_use((0, "r")) == 0
    await batcher.close()


async def test_a_request_refused_on_the_fast_path_gives_its_grant_back() -> None:
    limiter, clock = RateLimiter(), FakeClock()
    batcher, limits = limited_batcher(limiter, Executor(), clock)
    await settle()  # the loop has nothing else ready: the request would take the fast path
    with pytest.raises(InvalidArgument, match="batch size 9"):
        await batcher.submit("huge", batch_size=9, signature="s")
    assert not limits.instances[0].holding and limiter.in_use((0, "r")) == 0
    await batcher.close()


async def test_a_failed_batch_gives_its_grant_back() -> None:
    limiter, clock, run = RateLimiter(), FakeClock(), Executor()

    def boom(items: object) -> list[object]:
        raise RuntimeError("backend exploded")

    run.result = boom
    batcher, _ = limited_batcher(limiter, run, clock, max_queue_delay_us=10)
    task = submit(batcher, "a")
    await settle()
    clock.advance(10 * US)
    with pytest.raises(RuntimeError, match="exploded"):
        await task
    assert limiter.in_use((0, "r")) == 0
    await batcher.close()


async def test_a_grant_whose_requests_gave_up_is_given_back_without_running() -> None:
    limiter, clock = RateLimiter(), FakeClock()
    other = limiter.register(config("other", limited(r("R", 1))))
    waiter = Grants().bind(limiter.register(config("waiter", limited(r("R", 1)))))
    run = Executor()
    batcher, _ = limited_batcher(limiter, run, clock)
    assert other.try_acquire(0)
    task = submit(batcher, "a")
    await settle()
    waiter.request(0)  # behind the batcher's instance
    task.cancel()
    other.release(0)
    await settle()
    assert run.batches == []
    assert waiter.instances[0].holding  # the batcher gave R back, so it went on to waiter
    assert batcher.pending == 0
    await batcher.close()


async def test_an_expired_request_withdraws_its_instance() -> None:
    limiter, clock = RateLimiter(), FakeClock()
    other = limiter.register(config("other", limited(r("R", 1))))
    timeout = QueuePolicy(default_timeout_us=50)
    batcher, limits = limited_batcher(limiter, Executor(), clock, default_queue_policy=timeout)
    assert other.try_acquire(0)
    task = submit(batcher, "a")
    await settle()
    assert limits.instances[0].waiting
    clock.advance(50 * US)
    with pytest.raises(QueueTimeout):
        await task
    await settle()
    assert not limits.instances[0].waiting  # nothing left to ask for: withdrawn
    other.release(0)
    assert not limits.instances[0].holding
    await batcher.close()


async def test_close_drains_a_batch_waiting_for_its_grant() -> None:
    limiter, clock = RateLimiter(), FakeClock()
    other = limiter.register(config("other", limited(r("R", 1))))
    run = Executor()
    batcher, limits = limited_batcher(limiter, run, clock, max_queue_delay_us=1000)
    assert other.try_acquire(0)
    task = submit(batcher, "a")
    await settle()
    closing = asyncio.create_task(batcher.close())
    await settle()
    assert not closing.done() and not task.done()  # closing flushed it; it waits for R
    other.release(0)
    await closing
    assert await task == "out:a"
    assert limits.closed  # unregistered once nothing runs
    with pytest.raises(Unavailable):
        await batcher.submit("late", batch_size=1, signature="s")


async def test_an_aborted_driver_withdraws_its_waiting_instance() -> None:
    limiter, clock = RateLimiter(), FakeClock()
    other = limiter.register(config("other", limited(r("R", 1))))
    waiter = Grants().bind(limiter.register(config("waiter", limited(r("R", 1)))))
    batcher, limits = limited_batcher(limiter, Executor(), clock)
    assert other.try_acquire(0)
    task = submit(batcher, "a")
    await settle()
    waiter.request(0)
    driver = next(t for t in asyncio.all_tasks() if t.get_name() == "batcher:m")
    driver.cancel()
    with pytest.raises(Unavailable, match="shutting down"):
        await task
    assert not limits.instances[0].waiting
    other.release(0)
    assert waiter.instances[0].holding  # the batcher no longer stood in front
    await batcher.close()


# -- SequenceBatcher under the limiter -------------------------------------------------------


async def test_a_sequence_batch_waits_for_its_grant_and_takes_late_requests() -> None:
    limiter, clock = RateLimiter(), FakeClock()
    other = limiter.register(config("other", limited(r("R", 1))))
    model = Model()
    batcher: SequenceBatcher[Result] = SequenceBatcher(sequence_settings(), model, clock=clock)
    batcher.start(limiter.register(config("acc", limited(r("R", 1)))))
    assert other.try_acquire(0)
    first = send(batcher, 1, 10, start=True)
    await settle()
    second = send(batcher, 2, 20, start=True)
    await settle()
    assert model.batches == []
    other.release(0)
    await settle()
    assert model.batches == [(0, [(1, 10), (2, 20)])]
    assert [int((await t).outputs["OUTPUT"][0, 0]) for t in (first, second)] == [10, 20]
    assert limiter.in_use((0, "r")) == 0
    # closing while the instance waits for R: the request still runs once R comes back
    assert other.try_acquire(0)
    third = send(batcher, 1, 5, end=True)
    await settle()
    closing = asyncio.create_task(batcher.close())
    await settle()
    assert not closing.done()
    other.release(0)
    await closing
    assert int((await third).outputs["OUTPUT"][0, 0]) == 15


async def test_an_aborted_sequence_driver_withdraws_its_waiting_instance() -> None:
    limiter, clock = RateLimiter(), FakeClock()
    other = limiter.register(config("other", limited(r("R", 1))))
    waiter = Grants().bind(limiter.register(config("waiter", limited(r("R", 1)))))
    batcher: SequenceBatcher[Result] = SequenceBatcher(sequence_settings(), Model(), clock=clock)
    limits = limiter.register(config("acc", limited(r("R", 1))))
    batcher.start(limits)
    assert other.try_acquire(0)
    task = send(batcher, 1, 10, start=True)
    await settle()
    waiter.request(0)
    assert limits.instances[0].waiting
    driver = next(t for t in asyncio.all_tasks() if t.get_name() == "sequence-batcher:acc")
    driver.cancel()
    with pytest.raises(Unavailable, match="shutting down"):
        await task
    assert not limits.instances[0].waiting
    other.release(0)
    assert waiter.instances[0].holding
    await batcher.close()


async def test_a_failed_sequence_batch_gives_its_grant_back() -> None:
    limiter, clock = RateLimiter(), FakeClock()
    model = Model(fail=True)
    batcher: SequenceBatcher[Result] = SequenceBatcher(sequence_settings(), model, clock=clock)
    batcher.start(limiter.register(config("acc", limited(r("R", 1)))))
    request = InferRequest(
        "acc",
        "",
        {"INPUT": np.array([[1]], np.int32)},
        parameters={"sequence_id": 1, "sequence_start": True},
    )
    with pytest.raises(Exception, match="the model failed"):
        await batcher.submit(request, batch_size=1, signature=((1,),))
    assert limiter.in_use((0, "r")) == 0
    await batcher.close()
