"""The sequence batcher end to end: stock tritonclient (gRPC, HTTP, gRPC asyncio, streaming)
against the real ONNX service. The accumulator ``simple_sequence`` gives running sums; its
``oldest`` variant has two candidate slots; ``sequence_corrid`` (built here) has a UINT64 CORRID
control and two instances and echoes each request's correlation ID. Refusals and the idle
release are in test_sequence_errors.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from examples.build_sequence import SEQUENCE_CONFIG
from examples.onnx_graph import BATCH, finish_model, value_info
from tests.support import ServerThread, settings_for

MODEL = "simple_sequence"
OLDEST = "simple_sequence_oldest"
CORRID = "sequence_corrid"

SeqId = int | str
#: one request of a sequence: (INPUT value, sequence_id, start, end) -> OUTPUT value
Step = Callable[[int, SeqId, bool, bool], int]

CORRID_CONFIG = """name: "sequence_corrid"
backend: "onnxruntime"
max_batch_size: 4
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [
  { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "CORRID_OUT" data_type: TYPE_UINT64 dims: [ 1 ] }
]
instance_group [ { count: 2 kind: KIND_CPU } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
  state [ { input_name: "SUM_IN" output_name: "SUM_OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
}
"""


def _write_corrid_model(root: Path) -> None:
    """OUTPUT: the running sum of INPUT (state SUM_IN / SUM_OUT); CORRID_OUT: the CORRID input."""
    shape: list[int | str] = [BATCH, 1]
    nodes = [
        helper.make_node("Sub", ["one", "START"], ["not_start"]),
        helper.make_node("Mul", ["SUM_IN", "not_start"], ["kept"]),
        helper.make_node("Add", ["kept", "INPUT"], ["SUM_OUT"]),
        helper.make_node("Identity", ["SUM_OUT"], ["OUTPUT"]),
        helper.make_node("Identity", ["CORRID"], ["CORRID_OUT"]),
    ]
    int32 = TensorProto.INT32
    graph = helper.make_graph(
        nodes,
        CORRID,
        [value_info(n, int32, shape) for n in ("INPUT", "START", "SUM_IN")]
        + [value_info("CORRID", TensorProto.UINT64, shape)],
        [value_info(n, int32, shape) for n in ("OUTPUT", "SUM_OUT")]
        + [value_info("CORRID_OUT", TensorProto.UINT64, shape)],
        initializer=[helper.make_tensor("one", int32, [], [1])],
    )
    (root / CORRID / "1").mkdir(parents=True)
    (root / CORRID / "config.pbtxt").write_text(CORRID_CONFIG)
    (root / CORRID / "1" / "model.onnx").write_bytes(finish_model(graph).SerializeToString())


def _write_oldest_model(root: Path) -> None:
    """simple_sequence's graph with the oldest strategy: two candidate sequences at a time."""
    idle = "max_sequence_idle_microseconds: 5000000"
    config = SEQUENCE_CONFIG.replace(f'"{MODEL}"', f'"{OLDEST}"').replace(
        idle, idle + "\n  oldest { max_candidate_sequences: 2 max_queue_delay_microseconds: 1000 }"
    )
    assert "oldest {" in config and OLDEST in config
    (root / OLDEST / "1").mkdir(parents=True)
    (root / OLDEST / "config.pbtxt").write_text(config)
    (root / OLDEST / "1" / "model.onnx").write_bytes(
        (root / MODEL / "1" / "model.onnx").read_bytes()
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, grpc_frontend: str) -> Iterator[ServerThread]:
    """The ONNX service over simple_sequence, its oldest variant and sequence_corrid, on each
    gRPC transport in turn (their streams reach the sequence batcher by different paths)."""
    from examples.build_repository import build_repository
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("sequence_models")
    build_repository(root, [MODEL])
    _write_oldest_model(root)
    _write_corrid_model(root)
    settings = settings_for(root, grpc_frontend=grpc_frontend)
    with ServerThread(settings, [OnnxRuntime]) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        yield c
    finally:
        c.close()


def one_input(value: int, mod: Any = grpcclient) -> list[Any]:
    inp = mod.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [inp]


def flags(sid: SeqId, start: bool, end: bool) -> dict[str, Any]:
    return {"sequence_id": sid, "sequence_start": start, "sequence_end": end}


def run_sequence(step: Step, sid: SeqId, values: list[int]) -> list[int]:
    """Send ``values`` as one sequence (START on the first, END on the last); the outputs."""
    last = len(values) - 1
    return [step(v, sid, i == 0, i == last) for i, v in enumerate(values)]


async def run_sequence_aio(
    infer: Callable[..., Awaitable[Any]], model: str, sid: SeqId, values: list[int]
) -> list[Any]:
    last = len(values) - 1
    return [
        await infer(model, one_input(v, aioclient), **flags(sid, i == 0, i == last))
        for i, v in enumerate(values)
    ]


def run_sequences_at_once(
    server: ServerThread,
    model: str,
    sequences: Mapping[int, list[int]] | Mapping[SeqId, list[int]],
    timeout: float = 60,
) -> list[list[Any]]:
    """Every sequence driven at once from one asyncio client; each one's results, in order."""

    async def main() -> list[list[Any]]:
        c = aioclient.InferenceServerClient(server.grpc_url)
        try:
            return await asyncio.gather(
                *(run_sequence_aio(c.infer, model, s, v) for s, v in sequences.items())
            )
        finally:
            await c.close()

    return asyncio.run(asyncio.wait_for(main(), timeout))


def stats_counts(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """The model's (inference_count, execution_count) so far."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


@contextlib.contextmanager
def stepper(kind: str, server: ServerThread, model: str = MODEL) -> Iterator[tuple[Step, str]]:
    """A ``Step`` over one tritonclient flavour, and the status it reports INVALID_ARGUMENT as."""
    if kind == "http":
        h = httpclient.InferenceServerClient(server.http_url)

        def send(value: int, params: dict[str, Any]) -> Any:
            return h.infer(model, one_input(value, httpclient), **params)

        def done() -> None:
            h.close()

    elif kind == "grpc":
        g = grpcclient.InferenceServerClient(server.grpc_url)

        def send(value: int, params: dict[str, Any]) -> Any:
            return g.infer(model, one_input(value), **params)

        def done() -> None:
            g.close()

    else:  # grpc.aio, driven from this thread by a loop of its own
        loop = asyncio.new_event_loop()

        async def make() -> aioclient.InferenceServerClient:
            return aioclient.InferenceServerClient(server.grpc_url)

        a = loop.run_until_complete(make())

        def send(value: int, params: dict[str, Any]) -> Any:
            return loop.run_until_complete(a.infer(model, one_input(value, aioclient), **params))

        def done() -> None:
            loop.run_until_complete(a.close())
            loop.close()

    def step(value: int, sid: SeqId, start: bool, end: bool) -> int:
        return int(send(value, flags(sid, start, end)).as_numpy("OUTPUT")[0, 0])

    try:
        yield step, "400" if kind == "http" else "StatusCode.INVALID_ARGUMENT"
    finally:
        done()


@pytest.mark.parametrize("kind", ["grpc", "http", "grpc.aio"])
def test_accumulator_running_sums(kind: str, server: ServerThread) -> None:
    """Running sums from START to END; string and integer ids; after END a request needs START
    again, and a new START (also one in the middle of a sequence) begins from zero."""
    base = {"grpc": 1000, "http": 2000, "grpc.aio": 3000}[kind]
    with stepper(kind, server) as (step, invalid):
        values = [3, 1, 4, 1, 5, 9, 2, 6]
        assert run_sequence(step, base + 1, values) == list(itertools.accumulate(values))

        # a string id, interleaved with the integer id of the same digits: two sequences
        text = str(base + 2)
        assert step(10, text, True, False) == 10
        assert step(1, base + 2, True, False) == 1
        assert step(20, text, False, False) == 30
        assert step(2, base + 2, False, True) == 3
        assert step(30, text, False, True) == 60

        # after END the id is unknown again: a request without START is refused ...
        for sid in (base + 1, text):
            with pytest.raises(InferenceServerException) as info:
                step(1, sid, False, False)
            assert info.value.status() == invalid
            assert "must specify the START flag on the first request" in info.value.message()
            assert MODEL in info.value.message()
        # ... and a new START with the same id starts from zero
        assert run_sequence(step, base + 1, [7, 1, 1]) == [7, 8, 9]

        # START in the middle of a running sequence starts it over
        assert step(5, text, True, False) == 5
        assert step(5, text, False, False) == 10
        assert step(1, text, True, False) == 1
        assert step(1, text, False, True) == 2


def test_stream_interleaved_sequences(client: grpcclient.InferenceServerClient) -> None:
    """Three sequences interleaved on one stream, every request sent before any answer is
    read. Right after sequence 4001's END come a request for 4001 without START (refused) and
    a new START for 4001. Each response (matched by request id) holds its sequence's running
    sum, so the stream keeps each sequence's order."""
    rng = np.random.default_rng(7)
    plan: list[tuple[SeqId, int]] = [(4001, 12), ("stream-b", 20), (4003, 16), (4001, 8)]
    # (request id, sid, value, start, end, expected sum or None for a refusal), in send order
    lanes: list[list[tuple[str, SeqId, int, bool, bool, int | None]]] = []
    for n, (sid, length) in enumerate(plan):
        values = [int(v) for v in rng.integers(-50, 50, length)]
        sums = list(itertools.accumulate(values))
        lanes.append(
            [(f"{n}-{i}", sid, v, i == 0, i == length - 1, sums[i]) for i, v in enumerate(values)]
        )
    first, second, third, again = lanes
    order = [r for rs in itertools.zip_longest(first, second, third) for r in rs if r is not None]
    cut = order.index(first[-1]) + 1
    order[cut:cut] = [("late", 4001, 1, False, False, None), *again]

    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for rid, sid, value, start, end, _ in order:
            client.async_stream_infer(
                MODEL, one_input(value), request_id=rid, **flags(sid, start, end)
            )
        got: dict[str, int] = {}
        errors: list[str] = []
        for _ in order:
            result, error = responses.get(timeout=30)
            if error is not None:
                errors.append(error.message())
                continue
            response = result.get_response()
            assert [o.name for o in response.outputs] == ["OUTPUT"]
            got[response.id] = int(result.as_numpy("OUTPUT")[0, 0])
    finally:
        client.stop_stream()
    assert got == {rid: expected for rid, *_, expected in order if expected is not None}
    assert len(errors) == 1 and "sequence 4001" in errors[0] and "START flag" in errors[0]


def test_concurrent_sequences_share_batches(
    server: ServerThread, client: grpcclient.InferenceServerClient
) -> None:
    """8 sequences of 20 steps driven at once from the asyncio client: every sum is right, and
    some batches held more than one sequence. Each step of every sequence is sent in the same
    loop iteration and the model needs one slot per sequence (8 = max_batch_size), so even a
    loaded 2-core machine sees requests of different sequences queued together."""
    sequences = {5000 + n: [n + 1] * 20 for n in range(8)}
    before = stats_counts(client, MODEL)
    results = run_sequences_at_once(server, MODEL, sequences)
    for (sid, values), got in zip(sequences.items(), results, strict=True):
        sums = [int(r.as_numpy("OUTPUT")[0, 0]) for r in got]
        assert sums == list(itertools.accumulate(values)), sid
    after = stats_counts(client, MODEL)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 8 * 20
    assert executions < inferences, (inferences, executions)


def test_oldest_strategy_with_waiting_sequences(server: ServerThread) -> None:
    """Two candidate slots, four sequences at once: two wait until a slot frees (an END)."""
    sequences: dict[SeqId, list[int]] = {6001: [1, 2, 3], 6002: [10, 20], "c": [5] * 4, 6004: [7]}
    results = run_sequences_at_once(server, OLDEST, sequences)
    for (sid, values), got in zip(sequences.items(), results, strict=True):
        sums = [int(r.as_numpy("OUTPUT")[0, 0]) for r in got]
        assert sums == list(itertools.accumulate(values)), sid
    # every slot is free again: the same ids start over
    with stepper("grpc", server, OLDEST) as (step, _):
        for sid in sequences:
            assert step(4, sid, True, True) == 4


def test_corrid_control_echoes_each_sequence_id(
    server: ServerThread, client: grpcclient.InferenceServerClient
) -> None:
    """Six sequences at once on a model with two instances: each response carries its own
    sequence's UINT64 correlation ID and running sum."""
    ids = [11, 12, 13, 14, 2**40 + 1, 2**63 - 1]
    results = run_sequences_at_once(server, CORRID, {s: [s % 7 + 1] * 10 for s in ids})
    for sid, got in zip(ids, results, strict=True):
        assert [int(r.as_numpy("CORRID_OUT")[0, 0]) for r in got] == [sid] * 10
        assert got[0].as_numpy("CORRID_OUT").dtype == np.uint64
        assert [int(r.as_numpy("OUTPUT")[0, 0]) for r in got] == [
            (sid % 7 + 1) * (i + 1) for i in range(10)
        ]
        assert {o.name for o in got[0].get_response().outputs} == {"OUTPUT", "CORRID_OUT"}

    # HTTP JSON carries the whole uint64 range
    h = httpclient.InferenceServerClient(server.http_url)
    try:
        top = 2**64 - 1
        r = h.infer(CORRID, one_input(3, httpclient), **flags(top, True, True))
        assert int(r.as_numpy("CORRID_OUT")[0, 0]) == top
        with pytest.raises(InferenceServerException) as too_big:
            h.infer(CORRID, one_input(3, httpclient), **flags(2**64, True, True))
        assert too_big.value.status() == "400" and "sequence_id" in too_big.value.message()
    finally:
        h.close()

    # a string correlation ID cannot reach an integer CORRID input
    with pytest.raises(InferenceServerException) as info:
        client.infer(CORRID, one_input(1), **flags("seq-a", True, False))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = info.value.message()
    assert "'CORRID'" in message and "integer" in message and "seq-a" in message
    r = client.infer(CORRID, one_input(1), **flags(99, True, True))
    assert int(r.as_numpy("CORRID_OUT")[0, 0]) == 99
