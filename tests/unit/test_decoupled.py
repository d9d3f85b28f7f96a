"""The decoupled-model bridge (services/core/decoupled.py) and pb_utils' response sender."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from services.core.decoupled import ResponseStream, StreamClosed, StreamItem
from services.python import triton_python_backend_utils as pb_utils


def test_responses_from_another_thread_arrive_in_order_and_nothing_follows_final() -> None:
    async def scenario() -> list[StreamItem]:
        stream = ResponseStream()

        def model() -> None:
            for i in range(3):
                stream.send(StreamItem({"OUT": np.array([i])}, None, False))
            stream.send(StreamItem(None, None, True))
            with pytest.raises(StreamClosed):
                stream.send(StreamItem({"OUT": np.array([9])}, None, False))

        thread = threading.Thread(target=model)
        thread.start()
        got = [await asyncio.wait_for(stream.get(), 5) for _ in range(4)]
        thread.join()
        assert stream.final_sent and not stream.cancelled
        stream.cancel()
        assert stream.cancelled
        return got

    got = asyncio.run(scenario())
    assert [int(g.outputs["OUT"][0]) for g in got[:3] if g.outputs] == [0, 1, 2]
    assert got[3] == StreamItem(None, None, True)


def test_sender_rules() -> None:
    sent: list[tuple[object, bool]] = []
    cancelled = threading.Event()
    sender = pb_utils.InferenceResponseSender(
        lambda response, final: sent.append((response, final)), cancelled.is_set
    )
    response = pb_utils.InferenceResponse(output_tensors=[])
    sender.send(response)
    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    assert sent == [(response, False), (None, True)]
    with pytest.raises(pb_utils.TritonModelException, match="needs a response"):
        sender.send()
    assert not sender.is_cancelled()
    cancelled.set()
    assert sender.is_cancelled()


def test_response_sender_is_for_decoupled_models_only() -> None:
    request = pb_utils.InferenceRequest(model_name="m")
    assert not request.is_cancelled()
    with pytest.raises(pb_utils.TritonModelException, match="decoupled: true"):
        request.get_response_sender()
