"""Dynamic batcher, part 3: a request that finds nothing to batch with runs at once.

With no batching delay (or no dynamic batching), an empty queue, a free instance and no other
callback ready in the loop, ``submit`` skips the driver: ``run_now`` runs the request on the
caller's thread, or it goes to a batch task on that instance. Bursts still batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.core import batcher as batcher_module
from services.core.batcher import DynamicBatcher, Pending
from services.core.errors import InvalidArgument
from tests.unit.test_batcher import Executor, FakeClock, policy, settle, submit


class RunNow:
    """run_now fake: ``inline`` False declines (None), else it answers like Executor."""

    def __init__(self, inline: bool = True, error: BaseException | None = None) -> None:
        self.inline = inline
        self.error = error
        self.calls: list[tuple[int, list[str]]] = []

    def __call__(self, instance: int, items: Sequence[Pending[str]]) -> Sequence[object] | None:
        self.calls.append((instance, [it.payload for it in items]))
        if self.error is not None:
            raise self.error
        if not self.inline:
            return None
        return [f"now:{it.payload}" for it in items]


def make(
    run: Executor, run_now: RunNow, instances: int = 1, **kw: object
) -> DynamicBatcher[str, object]:
    batcher: DynamicBatcher[str, object] = DynamicBatcher(
        policy(**kw), run, instances=instances, clock=FakeClock(), run_now=run_now
    )
    batcher.start()
    return batcher


async def alone(batcher: DynamicBatcher[str, object], name: str) -> object:
    await settle()  # nothing else ready: the driver has run and gone back to sleep
    return await batcher.submit(name, batch_size=1, signature="s")


async def test_a_lone_request_runs_now_without_the_driver() -> None:
    run, now = Executor(), RunNow()
    batcher = make(run, now)
    assert await alone(batcher, "a") == "now:a"
    assert now.calls == [(0, ["a"])] and run.batches == []
    assert await alone(batcher, "b") == "now:b"  # the instance was given back
    assert now.calls[-1] == (0, ["b"])
    await batcher.close()


async def test_a_declined_request_runs_in_a_batch_task_on_the_instance_it_took() -> None:
    run, now = Executor(), RunNow(inline=False)
    batcher = make(run, now, instances=2)
    assert await alone(batcher, "a") == "out:a"
    assert now.calls == [(0, ["a"])] and run.batches == [(0, ["a"])]
    assert await alone(batcher, "b") == "out:b"
    await batcher.close()


async def test_a_burst_still_forms_one_batch() -> None:
    run, now = Executor(), RunNow()
    batcher = make(run, now)
    await settle()
    tasks = [submit(batcher, n) for n in "abc"]
    assert await asyncio.gather(*tasks) == ["out:a", "out:b", "out:c"]
    assert run.payloads == [["a", "b", "c"]] and now.calls == []
    await batcher.close()


@pytest.fixture
def always_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's own task is ready while the requests arrive: take that out of the decision,
    so only the condition under test can keep a request off the immediate path."""
    monkeypatch.setattr(batcher_module, "nothing_else_ready", lambda loop: True)


@pytest.mark.usefixtures("always_alone")
async def test_with_a_batching_delay_requests_wait_for_the_driver() -> None:
    run, now = Executor(), RunNow()
    batcher = make(run, now, max_queue_delay_us=100)
    task = submit(batcher, "a")
    await settle()
    assert now.calls == [] and run.batches == [] and batcher.pending == 1
    await batcher.close()  # draining runs it without waiting for the delay
    assert await task == "out:a"


@pytest.mark.usefixtures("always_alone")
async def test_while_the_instance_is_busy_requests_queue() -> None:
    run, now = Executor(gated=True), RunNow(inline=False)
    batcher = make(run, now)
    first = submit(batcher, "a")
    await settle()
    assert run.payloads == [["a"]]  # running on the only instance, gated
    second = submit(batcher, "b")
    await settle()
    assert len(now.calls) == 1 and batcher.pending == 1
    run.gates[0].set()
    await settle()
    run.gates[1].set()
    assert await asyncio.gather(first, second) == ["out:a", "out:b"]
    assert run.payloads == [["a"], ["b"]]
    await batcher.close()


async def test_a_failure_fails_only_that_request_and_frees_the_instance() -> None:
    run, now = Executor(), RunNow(error=InvalidArgument("bad input"))
    batcher = make(run, now)
    try:
        await alone(batcher, "a")
    except InvalidArgument as exc:
        assert "bad input" in str(exc)
    else:
        raise AssertionError("the failure did not reach the caller")
    now.error = None
    assert await alone(batcher, "b") == "now:b"
    await batcher.close()


async def test_a_wrong_batch_size_is_refused_before_running() -> None:
    run, now = Executor(), RunNow()
    batcher = make(run, now)
    await settle()
    try:
        await batcher.submit("big", batch_size=9, signature="s")
    except InvalidArgument as exc:
        assert "max_batch_size 8" in str(exc)
    else:
        raise AssertionError("a batch of 9 was accepted")
    assert now.calls == []
    await batcher.close()


@pytest.mark.usefixtures("always_alone")
async def test_with_preserve_ordering_a_later_request_does_not_overtake_one_run_in_a_task() -> None:
    run, now = Executor(gated=True), RunNow(inline=False)
    batcher = make(run, now, instances=2, preserve_ordering=True)
    first = submit(batcher, "a")
    await settle()
    second = submit(batcher, "b")
    await settle()
    assert run.payloads == [["a"], ["b"]]  # both running, one per instance
    run.gates[1].set()  # b finishes first ...
    await settle()
    overtook = second.done()
    run.gates[0].set()
    both = asyncio.gather(first, second)
    assert await asyncio.wait_for(both, 5) == ["out:a", "out:b"]  # (a lost answer: a timeout)
    await batcher.close()
    assert not overtook  # ... but waited for a
