"""Decoupled Python models for real: tritonclient streams against the Python service.

``repeat_python`` (examples/python_decoupled.py) answers each element of its input with its own
response, from a thread after ``execute`` returned, then sends the FINAL flag alone.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from examples.build_python import build_python_repository
from services.python.runtime import PythonRuntime
from tests.support import ServerThread, settings_for

WAIT_S = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root: Path = tmp_path_factory.mktemp("decoupled")
    build_python_repository(root, ["repeat_python", "add_sub_python"])
    with ServerThread(settings_for(root), [PythonRuntime]) as s:
        yield s


class Stream:
    """A tritonclient stream whose callback results land in a queue."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, values: list[int], request_id: str, delay_ms: int = 0) -> None:
        tensor = grpcclient.InferInput("IN", [len(values)], "INT32")
        tensor.set_data_from_numpy(np.array(values, dtype=np.int32))
        inputs = [tensor]
        if delay_ms:
            delay = grpcclient.InferInput("DELAY_MS", [1], "UINT32")
            delay.set_data_from_numpy(np.array([delay_ms], dtype=np.uint32))
            inputs.append(delay)
        self.client.async_stream_infer(
            "repeat_python", inputs, request_id=request_id, enable_empty_final_response=True
        )

    def take(self) -> tuple[Any, Any]:
        return self.results.get(timeout=WAIT_S)

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


@pytest.fixture
def stream(server: ServerThread) -> Iterator[Stream]:
    s = Stream(server.grpc_url)
    try:
        yield s
    finally:
        s.close()


def _final(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)


def test_one_response_per_element_then_an_empty_final(stream: Stream) -> None:
    stream.send([5, 6, 7], "r1")
    got = [stream.take() for _ in range(4)]
    assert all(error is None for _, error in got)
    results = [r for r, _ in got]
    assert [int(r.as_numpy("OUT")[0]) for r in results[:3]] == [5, 6, 7]
    assert [int(r.as_numpy("IDX")[0]) for r in results[:3]] == [0, 1, 2]
    assert [_final(r) for r in results] == [False, False, False, True]
    assert results[3].as_numpy("OUT") is None  # the FINAL flag came alone
    assert {r.get_response().id for r in results} == {"r1"}


def test_empty_input_gets_only_the_final_flag(stream: Stream) -> None:
    stream.send([], "empty")
    result, error = stream.take()
    assert error is None and _final(result) and result.get_response().id == "empty"
    assert stream.results.empty()


def test_requests_on_one_stream_interleave(stream: Stream) -> None:
    stream.send([1, 2, 3], "a", delay_ms=30)
    stream.send([10, 20, 30], "b", delay_ms=30)
    by_id: dict[str, list[int]] = {"a": [], "b": []}
    finals = 0
    while finals < 2:
        result, error = stream.take()
        assert error is None
        response = result.get_response()
        if _final(result):
            finals += 1
        else:
            by_id[response.id].append(int(result.as_numpy("OUT")[0]))
    assert by_id == {"a": [1, 2, 3], "b": [10, 20, 30]}


def test_an_error_response_ends_the_request_with_its_message(stream: Stream) -> None:
    stream.send([4, -1, 9], "bad")
    result, error = stream.take()
    assert error is None and int(result.as_numpy("OUT")[0]) == 4
    _, error = stream.take()
    assert isinstance(error, InferenceServerException)
    assert "IN[1] is -1; repeat takes non-negative values" in error.message()
    # the stream and the model keep serving
    stream.send([8], "after")
    result, error = stream.take()
    assert error is None and int(result.as_numpy("OUT")[0]) == 8
    assert _final(stream.take()[0])


def test_unary_calls_are_refused_with_what_to_use(server: ServerThread) -> None:
    tensor = grpcclient.InferInput("IN", [2], "INT32")
    tensor.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException) as err:
            client.infer("repeat_python", [tensor])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "decoupled" in err.value.message() and "ModelStreamInfer" in err.value.message()
        config = client.get_model_config("repeat_python").config
        assert config.model_transaction_policy.decoupled
    http_tensor = httpclient.InferInput("IN", [2], "INT32")
    http_tensor.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    with (
        httpclient.InferenceServerClient(server.http_url) as client,
        pytest.raises(InferenceServerException, match="decoupled"),
    ):
        client.infer("repeat_python", [http_tensor])


def test_a_client_leaving_mid_stream_leaves_the_service_serving(server: ServerThread) -> None:
    first = Stream(server.grpc_url)
    try:
        first.send(list(range(100)), "long", delay_ms=20)
        result, error = first.take()
        assert error is None and int(result.as_numpy("OUT")[0]) == 0
    finally:
        first.close()  # cancels the request; the model sees is_cancelled() and stops
    second = Stream(server.grpc_url)
    try:
        second.send([3], "next")
        result, error = second.take()
        assert error is None and int(result.as_numpy("OUT")[0]) == 3
    finally:
        second.close()


def test_non_decoupled_models_answer_once_on_a_stream(stream: Stream) -> None:
    a = grpcclient.InferInput("INPUT0", [4], "FP32")
    a.set_data_from_numpy(np.ones(4, dtype=np.float32))
    b = grpcclient.InferInput("INPUT1", [4], "FP32")
    b.set_data_from_numpy(np.ones(4, dtype=np.float32))
    stream.client.async_stream_infer("add_sub_python", [a, b], request_id="plain")
    result, error = stream.take()
    assert error is None and result.as_numpy("OUTPUT0").tolist() == [2, 2, 2, 2]
    assert "triton_final_response" not in result.get_response().parameters
