"""Rate limiter (rate_limiter.py) and the schedulers under it (batcher.py, sequence_batcher.py).

The limiter alone: grant order (execution count times priority, ties to the earlier ask, strictly
in order), per-device and global pools, counts defaulting to the largest need, refusals at
registration, withdrawal and unregistering. The schedulers: on a FakeClock, a batch waits for its
grant, is formed when the grant arrives, and every way out (failure, cancellation, timeout,
close, abort) gives the grant back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core.batcher import DynamicBatcher, QueuePolicy
from services.core.errors import InvalidArgument, ModelLoadError, QueueTimeout, Unavailable
from services.core.rate_limiter import GLOBAL, ModelLimits, RateLimiter
from services.core.requests import InferRequest
from services.core.sequence_batcher import SequenceBatcher
from services.core.settings import ServerSettings
from tests.unit.test_batcher import Executor, FakeClock, policy, settle
from tests.unit.test_sequence_batcher import Model, Result, send
from tests.unit.test_sequence_batcher import settings as sequence_settings

US = 1000


def config(name: str, *groups: str) -> mc.ModelConfig:
    """A config with these instance_group bodies (text format)."""
    text = f'name: "{name}" ' + " ".join(f"instance_group {{ {g} }}" for g in groups)
    return text_format.Parse(text, mc.ModelConfig())


def limited(resources: str, priority: int = 0, extra: str = "kind: KIND_CPU") -> str:
    """An instance_group body whose rate_limiter lists ``resources`` (text format)."""
    return f"{extra} rate_limiter {{ {resources} priority: {priority} }}"


def r(name: str, count: int, is_global: bool = False) -> str:
    return f'resources {{ name: "{name}" count: {count} global: {str(is_global).lower()} }}'


class Grants:
    """Records the grants of the models it binds: (model, instance) in grant order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []

    def bind(self, limits: ModelLimits) -> ModelLimits:
        limits.bind(lambda i: self.log.append((limits.model, i)))
        return limits


# -- the limiter alone -----------------------------------------------------------------------


def test_off_means_no_limiter_and_on_takes_the_flag_values() -> None:
    base = ServerSettings(model_repository=Path("/nonexistent"))
    assert RateLimiter.from_settings(base) is None
    on = ServerSettings(
        model_repository=Path("/nonexistent"),
        rate_limit="execution_count",
        rate_limit_resources=(("R", 1, -1),),
    )
    limiter = RateLimiter.from_settings(on)
    assert limiter is not None
    with pytest.raises(ModelLoadError, match="makes only 1 available"):
        limiter.register(config("m", limited(r("R", 2))))


def test_waiting_instances_are_granted_by_execution_count_times_priority() -> None:
    limiter, grants = RateLimiter(), Grants()
    holder = grants.bind(limiter.register(config("holder", limited(r("R", 1)))))
    a = grants.bind(limiter.register(config("a", limited(r("R", 1), priority=1))))
    b = grants.bind(limiter.register(config("b", limited(r("R", 1), priority=2))))
    assert holder.try_acquire(0)
    a.request(0)
    b.request(0)
    assert grants.log == []  # R is held
    holder.release(0)
    for _ in range(29):  # each grantee executes, and asks again as it gives R back
        model, _ = grants.log[-1]
        (a if model == "a" else b).release(0, again=True)
    order = "".join(m for m, _ in grants.log)
    # ties go to the earlier ask; priority 2 is granted half as often as priority 1
    assert order[:10] == "ababaabaab"
    assert order.count("a") == 20 and order.count("b") == 10


def test_an_instance_that_executed_more_waits_behind_one_that_executed_less() -> None:
    limiter, grants = RateLimiter(), Grants()
    busy = grants.bind(limiter.register(config("busy", limited(r("R", 1)))))
    fresh = grants.bind(limiter.register(config("fresh", limited(r("R", 1)))))
    for _ in range(3):
        assert busy.try_acquire(0)
        busy.release(0)
    assert fresh.try_acquire(0)
    busy.request(0)  # asks first, but has executed three times
    fresh.release(0, executed=False)  # not counted: fresh still has executed nothing
    assert grants.log == [("busy", 0)]
    fresh.request(0)
    busy.release(0)
    assert grants.log == [("busy", 0), ("fresh", 0)]
    # a grant at once is refused while someone waiting comes first
    assert not busy.try_acquire(0)


def test_the_first_in_order_holds_up_the_rest_even_when_their_resources_are_free() -> None:
    limiter, grants = RateLimiter(), Grants()
    big = grants.bind(limiter.register(config("big", limited(r("R", 2)))))
    small = grants.bind(limiter.register(config("small", limited(r("R", 1), extra="count: 2"))))
    free = grants.bind(limiter.register(config("free", "kind: KIND_CPU")))
    assert small.try_acquire(0)
    big.request(0)  # needs both copies: waits for small's instance 0
    small.request(1)  # one copy is free, but big comes first
    free.request(0)  # needs nothing, yet takes its turn in the order too
    assert grants.log == []
    small.release(0)
    assert grants.log == [("big", 0)]
    big.release(0)
    assert grants.log == [("big", 0), ("small", 1), ("free", 0)]


def test_per_device_pools_are_separate_and_a_global_one_is_shared() -> None:
    limiter, grants = RateLimiter(), Grants()
    gpus = "kind: KIND_GPU gpus: [ 0, 1 ]"
    per_device = grants.bind(limiter.register(config("pd", limited(r("R", 1), extra=gpus))))
    shared = grants.bind(limiter.register(config("gl", limited(r("G", 1, True), extra=gpus))))
    assert limiter.capacity((0, "r")) == limiter.capacity((1, "r")) == 1
    assert limiter.capacity((GLOBAL, "g")) == 1
    assert per_device.try_acquire(0) and per_device.try_acquire(1)  # device 0 and device 1
    assert shared.try_acquire(0)
    assert not shared.try_acquire(1)  # the other GPU, but the same global copy
    shared.request(1)
    shared.release(0)
    assert grants.log == [("gl", 1)]


def test_a_resource_not_given_exists_as_often_as_the_largest_need() -> None:
    limiter = RateLimiter()
    two = limiter.register(config("two", limited(r("R", 2))))
    ones = limiter.register(config("ones", limited(r("R", 1), extra="count: 3")))
    assert limiter.capacity((0, "r")) == 2
    assert ones.try_acquire(0) and ones.try_acquire(1)
    assert not ones.try_acquire(2)
    ones.release(0)
    ones.release(1)
    two.close()  # the largest need left is 1
    assert limiter.capacity((0, "r")) == 1
    assert ones.try_acquire(2) and not ones.try_acquire(0)


def test_a_need_above_the_given_count_is_refused_at_registration() -> None:
    limiter = RateLimiter([("r", 1, -1), ("R", 3, 1), ("g", 2, 0)])
    with pytest.raises(ModelLoadError) as refused:
        limiter.register(config("greedy", limited(r("R", 2))))  # names match whatever the case
    message = refused.value.message
    assert "model 'greedy'" in message and "instance 'greedy_0_0'" in message
    assert "needs 2 of rate_limiter resource 'R' (device 0)" in message
    assert "makes only 1 available" in message
    on_gpu1 = limiter.register(config("gpu1", limited(r("R", 3), extra="kind: KIND_GPU gpus: 1")))
    assert limiter.capacity((1, "r")) == 3  # what is given for device 1 beats every device's 1
    # a global resource gets the largest count given for its name on any device
    limiter.register(config("g", limited(r("G", 2, True))))
    with pytest.raises(ModelLoadError, match="makes only 2 available"):
        limiter.register(config("g3", limited(r("G", 3, True))))
    assert limiter.capacity((GLOBAL, "g")) == 2
    assert on_gpu1.try_acquire(0)  # the refused models left nothing behind


def test_a_resource_must_not_be_global_in_one_model_and_per_device_in_another() -> None:
    limiter = RateLimiter()
    limiter.register(config("a", limited(r("R", 1, True))))
    with pytest.raises(ModelLoadError, match="'r' is per device here but global in model 'a'"):
        limiter.register(config("b", limited(r("r", 1))))


def test_withdrawing_the_first_lets_the_next_through_and_unregistering_frees_all() -> None:
    limiter, grants = RateLimiter(), Grants()
    big = grants.bind(limiter.register(config("big", limited(r("R", 2)))))
    small = grants.bind(limiter.register(config("small", limited(r("R", 1), extra="count: 2"))))
    assert small.try_acquire(0)
    big.request(0)
    small.request(1)
    assert grants.log == []
    assert big.withdraw(0) and not big.withdraw(0)
    assert grants.log == [("small", 1)]
    big.request(0)
    small.close()  # held and granted copies come back; big gets both
    assert grants.log == [("small", 1), ("big", 0)]
    assert limiter.in_use((0, "r")) == 2
    with pytest.raises(RuntimeError, match="closed"):
        small.request(0)


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
