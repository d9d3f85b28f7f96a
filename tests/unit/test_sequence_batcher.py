"""Sequence batcher (sequence_batcher.py): slots, order, state, idle release, on a fake clock.

The fake model is the example accumulator: OUTPUT = INPUT * READY + ACC_IN * (1 - START), kept
as ACC_OUT; each batch is recorded as (instance, [(sequence, input), ...]).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core.batch_queue import Pending
from services.core.errors import InternalError, InvalidArgument, Unavailable
from services.core.requests import Array, InferRequest
from services.core.sequence_batcher import SequenceBatcher
from services.core.sequences import SequenceSettings
from tests.unit.test_batcher import FakeClock, settle

US = 1000

CONFIG = """
name: "acc" max_batch_size: 4
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 1000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "ID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
  state [ { input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
  %s
}
"""


def settings(extra: str = "", max_batch_size: int = 4) -> SequenceSettings:
    config = text_format.Parse(CONFIG % extra, mc.ModelConfig())
    config.max_batch_size = max_batch_size
    found = SequenceSettings.from_config(config, Path("/nonexistent"))
    assert found is not None
    return found


@dataclass
class Result:
    outputs: dict[str, Array]


@dataclass
class Model:
    """run_batch fake: the accumulator; ``gated`` batches wait for ``release()``."""

    gated: bool = False
    fail: bool = False
    batches: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    gates: list[asyncio.Event] = field(default_factory=list)

    async def __call__(
        self, instance: int, items: Sequence[Pending[InferRequest]]
    ) -> Sequence[Result]:
        inputs = [it.payload.inputs for it in items]
        self.batches.append(
            (instance, [(int(i["ID"][0, 0]), int(i["INPUT"][0, 0])) for i in inputs])
        )
        if self.gated:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
        if self.fail:
            raise InternalError("the model failed")
        results = []
        for i in inputs:
            ints = {k: v.astype(np.int32) for k, v in i.items()}
            acc = ints["INPUT"] * ints["READY"] + ints["ACC_IN"] * (1 - ints["START"])
            results.append(Result({"OUTPUT": acc, "ACC_OUT": acc.copy()}))
        return results

    async def release(self) -> None:
        for gate in self.gates:
            gate.set()
        await settle()


def make(
    model: Model, clock: FakeClock, instances: int = 1, **kw: object
) -> SequenceBatcher[Result]:
    batcher: SequenceBatcher[Result] = SequenceBatcher(
        settings(**kw),  # type: ignore[arg-type]
        model,
        instances=instances,
        clock=clock,
    )
    batcher.start()
    return batcher


def send(
    batcher: SequenceBatcher[Result], sid: int, value: int, start: bool = False, end: bool = False
) -> asyncio.Task[Result]:
    request = InferRequest(
        "acc",
        "",
        {"INPUT": np.array([[value]], np.int32)},
        parameters={"sequence_id": sid, "sequence_start": start, "sequence_end": end},
    )
    return asyncio.create_task(batcher.submit(request, batch_size=1, signature=((1,),)))


async def value(task: asyncio.Task[Result]) -> int:
    result = await task
    assert set(result.outputs) == {"OUTPUT"}  # the state never reaches the client
    return int(result.outputs["OUTPUT"][0, 0])


async def test_a_sequence_runs_in_order_one_request_at_a_time() -> None:
    model, clock = Model(gated=True), FakeClock()
    batcher = make(model, clock)
    tasks = [send(batcher, 7, v, start=(v == 1)) for v in (1, 2, 3)]
    await settle()
    assert model.batches == [(0, [(7, 1)])] and batcher.pending == 2
    for _ in range(2):
        await model.release()
    await model.release()
    assert [b for _, b in model.batches] == [[(7, 1)], [(7, 2)], [(7, 3)]]
    assert [await value(t) for t in tasks] == [1, 3, 6]
    await batcher.close()


async def test_ready_requests_of_different_sequences_form_one_batch_oldest_first() -> None:
    model, clock = Model(gated=True), FakeClock()
    batcher = make(model, clock)
    first = send(batcher, 1, 10, start=True)
    await settle()
    later = []
    for sid in (3, 2, 4):
        clock.now += US
        later.append(send(batcher, sid, sid, start=True))
        await settle()
    clock.now += US
    later.append(send(batcher, 1, 5))
    await settle()
    await model.release()
    await model.release()
    # sequence 1's second request waits for its first; the others batch in arrival order
    assert [b for _, b in model.batches] == [[(1, 10)], [(3, 3), (2, 2), (4, 4), (1, 5)]]
    assert await value(first) == 10
    assert [await value(t) for t in later] == [3, 2, 4, 15]
    await batcher.close()


async def test_sequences_beyond_the_slots_wait_for_one_to_end() -> None:
    model, clock = Model(), FakeClock()
    batcher = make(model, clock, max_batch_size=2)
    assert await value(send(batcher, 1, 1, start=True)) == 1
    assert await value(send(batcher, 2, 2, start=True)) == 2
    waiting = send(batcher, 3, 3, start=True)
    await settle()
    assert batcher.active_sequences == 3 and not waiting.done()
    assert await value(send(batcher, 1, 1, end=True)) == 2
    assert await value(waiting) == 3  # sequence 1's slot went to sequence 3
    assert batcher.active_sequences == 2
    await batcher.close()


async def test_sequences_stay_on_their_instance() -> None:
    model, clock = Model(), FakeClock()
    batcher = make(model, clock, instances=2, max_batch_size=1)
    for sid in (1, 2):
        await value(send(batcher, sid, 1, start=True))
    for step in range(3):
        await asyncio.gather(*(send(batcher, sid, step) for sid in (1, 2)))
    placed = {
        sid: {i for i, batch in model.batches for s, _ in batch if s == sid} for sid in (1, 2)
    }
    assert placed == {1: {0}, 2: {1}}
    await batcher.close()


async def test_idle_sequences_lose_their_slot_and_state() -> None:
    model, clock = Model(), FakeClock()
    batcher = make(model, clock)
    assert await value(send(batcher, 9, 4, start=True)) == 4
    clock.advance(999 * US)
    await settle()
    assert await value(send(batcher, 9, 1)) == 5  # not idle long enough
    clock.advance(1000 * US)
    await settle()
    assert batcher.active_sequences == 0
    with pytest.raises(InvalidArgument, match="must specify the START flag"):
        await send(batcher, 9, 1)
    assert await value(send(batcher, 9, 2, start=True)) == 2
    await batcher.close()


async def test_start_restarts_a_running_sequence_and_end_closes_it() -> None:
    model, clock = Model(), FakeClock()
    batcher = make(model, clock)
    assert await value(send(batcher, 4, 5, start=True)) == 5
    assert await value(send(batcher, 4, 6, start=True)) == 6  # the state was reset
    assert await value(send(batcher, 4, 1, end=True)) == 7
    with pytest.raises(InvalidArgument, match=r"sequence 4 .* START flag"):
        await send(batcher, 4, 1)
    assert batcher.active_sequences == 0
    await batcher.close()


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({}, "non-zero or non-empty correlation ID"),
        ({"sequence_id": 0, "sequence_start": True}, "non-zero or non-empty correlation ID"),
        ({"sequence_id": "a", "sequence_start": True}, "integer correlation IDs"),
        ({"sequence_id": 3, "sequence_start": "yes"}, "'sequence_start' must be a boolean"),
        ({"sequence_id": 1.5, "sequence_start": True}, "unsigned 64-bit integer or a string"),
    ],
)
async def test_bad_sequence_parameters_are_refused(
    parameters: dict[str, object], message: str
) -> None:
    model, clock = Model(), FakeClock()
    batcher = make(model, clock)
    request = InferRequest("acc", "", {"INPUT": np.zeros((1, 1), np.int32)})
    request.parameters.update(parameters)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=message):
        await batcher.submit(request, batch_size=1, signature=())
    assert await value(send(batcher, 1, 3, start=True)) == 3
    await batcher.close()


async def test_a_request_must_carry_one_item() -> None:
    batcher = make(Model(), FakeClock())
    request = InferRequest("acc", "", {}, parameters={"sequence_id": 1, "sequence_start": True})
    with pytest.raises(InvalidArgument, match="batch size 1"):
        await batcher.submit(request, batch_size=2, signature=())
    await batcher.close()


async def test_a_failed_batch_fails_its_requests_and_keeps_the_state() -> None:
    model, clock = Model(), FakeClock()
    batcher = make(model, clock)
    assert await value(send(batcher, 1, 2, start=True)) == 2
    model.fail = True
    with pytest.raises(InternalError, match="the model failed"):
        await send(batcher, 1, 100)
    model.fail = False
    assert await value(send(batcher, 1, 1)) == 3
    await batcher.close()


async def test_a_request_whose_caller_gave_up_still_runs() -> None:
    model, clock = Model(gated=True), FakeClock()
    batcher = make(model, clock)
    first = send(batcher, 1, 1, start=True)
    await settle()
    gone = send(batcher, 1, 10)
    await settle()
    gone.cancel()
    await model.release()
    await model.release()
    last = send(batcher, 1, 100)
    await settle()
    await model.release()
    assert await value(first) == 1
    assert await value(last) == 111  # the cancelled request's 10 is in the state
    await batcher.close()


async def test_direct_waits_for_slot_utilization_or_the_delay() -> None:
    model, clock = Model(), FakeClock()
    extra = "direct { max_queue_delay_microseconds: 100 minimum_slot_utilization: 0.75 }"
    batcher = make(model, clock, extra=extra)
    tasks = [send(batcher, sid, sid, start=True, end=True) for sid in (1, 2)]
    await settle()
    assert model.batches == []  # 2 of 4 slots ready: under 0.75
    clock.advance(100 * US)
    await settle()
    assert [b for _, b in model.batches] == [[(1, 1), (2, 2)]]
    await asyncio.gather(*tasks)
    tasks = [send(batcher, sid, 1, start=True) for sid in (3, 4, 5)]
    await settle()
    assert [b for _, b in model.batches][-1] == [(3, 1), (4, 1), (5, 1)]  # 3 of 4: at once
    await asyncio.gather(*tasks)
    await batcher.close()


async def test_oldest_caps_candidates_and_honours_preferred_sizes() -> None:
    model, clock = Model(), FakeClock()
    extra = "oldest { max_candidate_sequences: 3 preferred_batch_size: [ 2 ] "
    extra += "max_queue_delay_microseconds: 50 }"
    batcher = make(model, clock, extra=extra)
    one = send(batcher, 1, 1, start=True)
    await settle()
    assert model.batches == []
    two = send(batcher, 2, 2, start=True)
    await settle()
    assert [b for _, b in model.batches] == [[(1, 1), (2, 2)]]  # preferred size reached
    await asyncio.gather(one, two)
    three, four = send(batcher, 3, 3, start=True), send(batcher, 4, 4, start=True)
    await settle()
    clock.advance(50 * US)
    await settle()
    assert [b for _, b in model.batches][-1] == [(3, 3)]  # 4 waits: 3 candidates at most
    assert await value(three) == 3 and not four.done()
    end = send(batcher, 1, 0, end=True)
    for _ in range(2):  # sequence 1's END, then 4's START in the freed slot, each after 50 µs
        await settle()
        clock.advance(50 * US)
        await settle()
    assert await value(end) == 1
    assert await value(four) == 4
    await batcher.close()


async def test_close_runs_what_is_queued_and_then_refuses() -> None:
    model, clock = Model(gated=True), FakeClock()
    batcher = make(model, clock)
    tasks = [send(batcher, 1, v, start=(v == 1)) for v in (1, 2)]
    await settle()
    closing = asyncio.create_task(batcher.close())
    await settle()
    for _ in range(3):
        await model.release()
    await closing
    assert [await value(t) for t in tasks] == [1, 3]
    with pytest.raises(Unavailable):
        await send(batcher, 2, 1, start=True)


async def test_a_batch_of_every_slot_runs_without_waiting_for_the_delay() -> None:
    model, clock = Model(), FakeClock()
    extra = "oldest { max_candidate_sequences: 2 max_queue_delay_microseconds: 1000 }"
    batcher = make(model, clock, extra=extra)
    tasks = [send(batcher, sid, sid, start=True) for sid in (1, 2)]
    await settle()
    assert [b for _, b in model.batches] == [[(1, 1), (2, 2)]]  # no more can join: both slots
    assert [await value(t) for t in tasks] == [1, 2]
    await batcher.close()
