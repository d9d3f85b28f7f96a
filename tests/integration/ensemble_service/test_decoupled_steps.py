"""An ensemble with a decoupled step: one ensemble response per response of the step, only
the final flag when the step sends nothing, streaming only, a failing step named, and cancelling
the client's stream cancels the step's.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support import ServerThread


class _Stream:
    """A tritonclient stream to the ensemble service whose callbacks land in a queue."""

    def __init__(self, url: str) -> None:
        client = grpcclient.InferenceServerClient(url)
        self.client: grpcclient.InferenceServerClient | None = client
        self.results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, model: str, x: np.ndarray, count: int, request_id: str = "") -> None:
        counts = np.full((x.shape[0], 1), count, dtype=np.uint32)
        tensors = []
        for name, arr, datatype in (("INPUT0", x, "INT32"), ("COUNT", counts, "UINT32")):
            tensor = grpcclient.InferInput(name, list(arr.shape), datatype)
            tensor.set_data_from_numpy(arr)
            tensors.append(tensor)
        assert self.client is not None
        self.client.async_stream_infer(
            model, tensors, request_id=request_id, enable_empty_final_response=True
        )

    def until_final(self) -> list[Any]:
        """Every response up to the one flagged final (raises on an error)."""
        responses = []
        while True:
            result, error = self.results.get(timeout=10)
            if error is not None:
                raise error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses

    def close(self) -> None:
        if self.client is not None:
            self.client.stop_stream(cancel_requests=True)
            self.client.close()
            self.client = None


@pytest.fixture
def stream(servers: tuple[ServerThread, Path, ServerThread]) -> Iterator[_Stream]:
    s = _Stream(servers[0].grpc_url)
    try:
        yield s
    finally:
        s.close()


def _x(batch: int = 1) -> np.ndarray:
    return np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)


def test_each_decoupled_response_runs_the_next_step(stream: _Stream) -> None:
    x = _x(2)
    stream.send("repeat_then_simple", x, 3, request_id="d-1")
    responses = stream.until_final()
    with_data = [r for r in responses if r.as_numpy("OUTPUT0") is not None]
    assert len(with_data) == 3
    assert all(r.get_response().id == "d-1" for r in responses)
    # response k: simple(x, k) = (x + k, x - k); the order is the order the simple calls ended
    ks = sorted(int((r.as_numpy("OUTPUT0") - x)[0, 0]) for r in with_data)
    assert ks == [0, 1, 2]
    for r in with_data:
        k = int((r.as_numpy("OUTPUT0") - x)[0, 0])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x + k)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), x - k)
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in responses]
    assert finals.count(True) == 1 and finals[-1]


def test_no_response_from_the_step_gives_only_the_final_flag(stream: _Stream) -> None:
    stream.send("repeat_then_simple", _x(), 0)
    (only,) = stream.until_final()
    assert only.as_numpy("OUTPUT0") is None


def test_decoupled_ensemble_is_streaming_only(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("repeat_then_simple").config
    # filled in at load from the step (the file does not say it), as Triton does
    assert config.model_transaction_policy.decoupled
    assert not client.get_model_config("chain").config.model_transaction_policy.decoupled
    with pytest.raises(InferenceServerException) as err:
        x = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        x.set_data_from_numpy(_x())
        n = grpcclient.InferInput("COUNT", [1, 1], "UINT32")
        n.set_data_from_numpy(np.ones((1, 1), np.uint32))
        client.infer("repeat_then_simple", [x, n])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "ModelStreamInfer" in err.value.message()


def test_failing_decoupled_step_names_the_step(stream: _Stream) -> None:
    stream.send("repeat_then_simple", _x(), 100)
    with pytest.raises(InferenceServerException) as err:
        stream.until_final()
    message = err.value.message()
    assert "ensemble 'repeat_then_simple' step 0 (model 'repeat_count_python')" in message
    assert "COUNT is 100" in message
    # the stream and the service go on
    stream.send("repeat_then_simple", _x(), 1)
    responses = stream.until_final()
    assert [r.as_numpy("OUTPUT0") is not None for r in responses].count(True) == 1


def test_cancelling_the_stream_stops_the_decoupled_step(
    servers: tuple[ServerThread, Path, ServerThread], stream: _Stream
) -> None:
    """A response every 200 ms, 20 asked for: cancelled after the first, the step's stream is
    cancelled too (the model sees it and stops), so ``simple`` is not called 20 times."""
    with grpcclient.InferenceServerClient(servers[2].grpc_url) as steps:

        def simple_calls() -> int:
            stats = steps.get_inference_statistics("simple").model_stats
            return sum(s.inference_stats.success.count for s in stats)

        before = simple_calls()
        stream.send("slow_repeat_then_simple", _x(), 20)
        first, error = stream.results.get(timeout=10)
        assert error is None and first.as_numpy("OUTPUT0") is not None
        stream.close()
        time.sleep(1.0)  # five more responses' time, were the step still running
        assert simple_calls() - before <= 2
