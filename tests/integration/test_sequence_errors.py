"""The sequence batcher's refusals and idle release, end to end against the real ONNX service:
every caller mistake is refused with INVALID_ARGUMENT (HTTP 400) saying what to fix, and leaves
the sequence it names as it was; the control and state tensors stay inside the server; a
sequence with nothing queued for max_sequence_idle_microseconds loses its slot and its state."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support import ServerThread, settings_for

MODEL = "simple_sequence"
#: simple_sequence with one slot (oldest, max_candidate_sequences 1), in the idle repository
ONE_SLOT = "simple_sequence_one_slot"
INVALID = "StatusCode.INVALID_ARGUMENT"
NO_ID = "must specify a non-zero or non-empty correlation ID"
NO_START = "must specify the START flag on the first request of the sequence"


def _start(root: Path) -> ServerThread:
    from services.onnx.runtime import OnnxRuntime

    return ServerThread(settings_for(root), [OnnxRuntime]).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    from examples.build_repository import build_repository

    root = tmp_path_factory.mktemp("sequence_models")
    build_repository(root, [MODEL])
    running = _start(root)
    try:
        yield running
    finally:
        running.stop()


@dataclass
class Clients:
    grpc: grpcclient.InferenceServerClient
    http: httpclient.InferenceServerClient
    #: a raw stub, for parameters tritonclient will not send (sequence_id 0, a non-bool flag)
    stub: service_pb2_grpc.GRPCInferenceServiceStub

    def step(self, value: int, sid: int, start: bool = False, end: bool = False) -> int:
        r = self.grpc.infer(
            MODEL, [one_input(value)], sequence_id=sid, sequence_start=start, sequence_end=end
        )
        return int(r.as_numpy("OUTPUT")[0, 0])


@pytest.fixture
def clients(server: ServerThread) -> Iterator[Clients]:
    g = grpcclient.InferenceServerClient(server.grpc_url)
    h = httpclient.InferenceServerClient(server.http_url)
    channel = grpc.insecure_channel(server.grpc_url)
    try:
        yield Clients(g, h, service_pb2_grpc.GRPCInferenceServiceStub(channel))
    finally:
        channel.close()
        h.close()
        g.close()


def one_input(value: int, mod: Any = grpcclient, rows: int = 1, name: str = "INPUT") -> Any:
    inp = mod.InferInput(name, [rows, 1], "INT32")
    inp.set_data_from_numpy(np.full((rows, 1), value, dtype=np.int32))
    return inp


def raw_infer(c: Clients, **parameters: bool | int | str) -> None:
    """ModelInfer with INPUT = [[1]] and exactly these request parameters."""
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
    request.raw_input_contents.append(np.ones((1, 1), np.int32).tobytes())
    for key, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].string_param = value
    c.stub.ModelInfer(request, timeout=30)


def refusal(call: Callable[[], object]) -> tuple[str, str]:
    """The (status, message) ``call`` is refused with, whichever client made it."""
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status()), str(exc.message())
    except grpc.RpcError as exc:
        return str(exc.code()), str(exc.details())
    raise AssertionError("the request was not refused")


#: (bad request for the running sequence ``sid``, its status, a part of its message)
BadCall = Callable[[Clients, int], object]
CASES: dict[str, tuple[BadCall, str, str]] = {
    "no sequence_id": (lambda c, sid: c.grpc.infer(MODEL, [one_input(1)]), INVALID, NO_ID),
    "no sequence_id over HTTP": (
        lambda c, sid: c.http.infer(MODEL, [one_input(1, httpclient)]),
        "400",
        NO_ID,
    ),
    "sequence_id 0": (
        lambda c, sid: raw_infer(c, sequence_id=0, sequence_start=True),
        INVALID,
        NO_ID,
    ),
    "empty sequence_id": (
        lambda c, sid: raw_infer(c, sequence_id="", sequence_start=True),
        INVALID,
        NO_ID,
    ),
    "negative sequence_id": (
        lambda c, sid: raw_infer(c, sequence_id=-sid),
        INVALID,
        "'sequence_id' must be an unsigned 64-bit integer or a string",
    ),
    "sequence_end not a boolean": (
        lambda c, sid: raw_infer(c, sequence_id=sid, sequence_end=1),
        INVALID,
        "'sequence_end' must be a boolean",
    ),
    "no START for an unknown id": (
        lambda c, sid: c.grpc.infer(MODEL, [one_input(1)], sequence_id=sid + 1),
        INVALID,
        NO_START,
    ),
    "batch size 2": (
        lambda c, sid: c.grpc.infer(MODEL, [one_input(1, rows=2)], sequence_id=sid),
        INVALID,
        "carries one item (batch size 1); this one has 2",
    ),
    "control input START sent by the client": (
        lambda c, sid: c.grpc.infer(
            MODEL,
            [one_input(1), one_input(1, name="START")],
            sequence_id=sid,
            sequence_start=True,
            sequence_end=True,
        ),
        INVALID,
        "unexpected input 'START' for model 'simple_sequence'; expected one of 'INPUT'",
    ),
    "state input ACC_IN sent by the client": (
        lambda c, sid: c.http.infer(
            MODEL,
            [one_input(1, httpclient), one_input(100, httpclient, name="ACC_IN")],
            sequence_id=sid,
        ),
        "400",
        "unexpected input 'ACC_IN'",
    ),
    "state output ACC_OUT requested": (
        lambda c, sid: c.grpc.infer(
            MODEL,
            [one_input(1)],
            outputs=[grpcclient.InferRequestedOutput("ACC_OUT")],
            sequence_id=sid,
            sequence_end=True,
        ),
        INVALID,
        "unexpected inference output 'ACC_OUT'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_request_leaves_the_sequence_intact(case: str, clients: Clients) -> None:
    """The bad request comes in the middle of a sequence (and names it where it can): it is
    refused, and the sequence goes on from the sum it had."""
    bad, status, message = CASES[case]
    sid = 7000 + 10 * list(CASES).index(case)
    assert clients.step(10, sid, start=True) == 10
    got_status, got_message = refusal(lambda: bad(clients, sid))
    assert got_status == status
    assert message in got_message
    assert clients.step(5, sid) == 15
    assert clients.step(1, sid, end=True) == 16


def test_sequence_id_beyond_uint64_is_refused(clients: Clients) -> None:
    """Only JSON can carry it (gRPC's int64_param / uint64_param cannot)."""
    status, message = refusal(
        lambda: clients.http.infer(
            MODEL,
            [one_input(1, httpclient)],
            sequence_id=2**64 + 5,
            sequence_start=True,
            sequence_end=True,
        )
    )
    assert status == "400" and "sequence_id" in message
    top = clients.http.infer(
        MODEL,
        [one_input(2, httpclient)],
        sequence_id=2**64 - 1,
        sequence_start=True,
        sequence_end=True,
    )
    assert int(top.as_numpy("OUTPUT")[0, 0]) == 2  # the largest one is fine


def test_only_input_and_output_are_visible(clients: Clients) -> None:
    """The control inputs (START, READY) and the state (ACC_IN / ACC_OUT) are the server's:
    not in any response, nor in the model's metadata or its config's inputs and outputs."""
    r = clients.grpc.infer(
        MODEL, [one_input(2)], sequence_id=7900, sequence_start=True, sequence_end=True
    )
    assert [o.name for o in r.get_response().outputs] == ["OUTPUT"]
    h = clients.http.infer(
        MODEL, [one_input(2, httpclient)], sequence_id=7901, sequence_start=True, sequence_end=True
    )
    assert [o["name"] for o in h.get_response()["outputs"]] == ["OUTPUT"]

    for meta in (
        clients.grpc.get_model_metadata(MODEL, as_json=True),
        clients.http.get_model_metadata(MODEL),
    ):
        assert [t["name"] for t in meta["inputs"]] == ["INPUT"]
        assert [t["name"] for t in meta["outputs"]] == ["OUTPUT"]
    for config in (
        clients.grpc.get_model_config(MODEL, as_json=True)["config"],
        clients.http.get_model_config(MODEL),
    ):
        assert [t["name"] for t in config["input"]] == ["INPUT"]
        assert [t["name"] for t in config["output"]] == ["OUTPUT"]
        controls = config["sequence_batching"]["control_input"]
        assert [c["name"] for c in controls] == ["START", "READY"]


# ---- idle release ---------------------------------------------------------------------------
@pytest.fixture
def idle_server(tmp_path: Path) -> Iterator[ServerThread]:
    """simple_sequence and a one-slot copy, both releasing a sequence idle for 200 ms."""
    from examples.build_repository import build_repository

    build_repository(tmp_path, [MODEL])
    config = tmp_path / MODEL / "config.pbtxt"
    text = config.read_text()
    idle = "max_sequence_idle_microseconds: 200000"
    assert "max_sequence_idle_microseconds: 5000000" in text
    text = text.replace("max_sequence_idle_microseconds: 5000000", idle)
    config.write_text(text)
    one_slot = tmp_path / ONE_SLOT
    (one_slot / "1").mkdir(parents=True)
    (one_slot / "1" / "model.onnx").write_bytes(
        (tmp_path / MODEL / "1" / "model.onnx").read_bytes()
    )
    (one_slot / "config.pbtxt").write_text(
        text.replace(f'"{MODEL}"', f'"{ONE_SLOT}"').replace(
            idle, idle + "\n  oldest { max_candidate_sequences: 1 }"
        )
    )
    running = _start(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def test_idle_sequence_loses_its_state(
    idle_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    c = grpcclient.InferenceServerClient(idle_server.grpc_url)

    def step(value: int, start: bool = False) -> int:
        r = c.infer(MODEL, [one_input(value)], sequence_id=42, sequence_start=start)
        return int(r.as_numpy("OUTPUT")[0, 0])

    try:
        assert step(5, start=True) == 5
        # requests 50 ms apart keep it for longer than the 200 ms timeout: idle is since the last
        for i in range(1, 7):
            time.sleep(0.05)
            assert step(1) == 5 + i
        with caplog.at_level(logging.WARNING, logger="services.core.sequence_batcher"):
            time.sleep(0.6)
            with pytest.raises(InferenceServerException) as info:
                step(1)
        assert info.value.status() == INVALID
        assert NO_START in info.value.message() and "sequence 42" in info.value.message()
        assert any("sequence 42 released (idle" in r.getMessage() for r in caplog.records)
        assert step(3, start=True) == 3  # a new START begins from zero
    finally:
        c.close()


def test_idle_sequence_frees_its_slot_for_a_waiting_one(idle_server: ServerThread) -> None:
    """One slot: B's START waits while A holds the slot, and runs once A is released idle."""
    c = grpcclient.InferenceServerClient(idle_server.grpc_url)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    try:
        a = c.infer(ONE_SLOT, [one_input(4)], sequence_id=1, sequence_start=True)
        assert int(a.as_numpy("OUTPUT")[0, 0]) == 4
        sent = time.monotonic()
        c.async_infer(
            ONE_SLOT,
            [one_input(9)],
            lambda result, error: answers.put((result, error)),
            sequence_id=2,
            sequence_start=True,
        )
        result, error = answers.get(timeout=30)
        waited = time.monotonic() - sent
        assert error is None, error
        assert int(result.as_numpy("OUTPUT")[0, 0]) == 9
        assert waited > 0.1  # B could only start once A had been idle for 200 ms
        with pytest.raises(InferenceServerException) as info:
            c.infer(ONE_SLOT, [one_input(1)], sequence_id=1)
        assert info.value.status() == INVALID and NO_START in info.value.message()
        b = c.infer(ONE_SLOT, [one_input(1)], sequence_id=2, sequence_end=True)
        assert int(b.as_numpy("OUTPUT")[0, 0]) == 10
    finally:
        c.close()
