"""``ensemble_scheduling.max_inflight_requests`` on a decoupled ensemble (services/ensemble/
streaming.py): a decoupled step whose responses arrive at once starts at most N flows of the
steps after it; the rest wait, and every response still yields its ensemble response.

The scheduling is tested alone here: the decoupled step's stream and the plain step's call are
in-process stand-ins (the real calls are in tests/integration/ensemble_service/)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import numpy as np
import pytest

from protos.gen.inference import grpc_service_pb2 as pb
from services.core.decoupled import ResponseStream
from services.core.gateway_client import WireTensor
from services.core.requests import InferRequest
from services.ensemble.graph import Step, build_graph
from services.ensemble.streaming import StreamingEnsemble
from tests.unit.test_ensemble_decoupled import _lookup, decoupled
from tests.unit.test_ensemble_graph import ensemble, step

RESPONSES = 6


def _response(k: int, final: bool) -> pb.ModelStreamInferResponse:
    reply = pb.ModelStreamInferResponse()
    response = reply.infer_response
    response.outputs.add(name="Z", datatype="FP32", shape=[1, 4])
    response.raw_output_contents.append(np.full((1, 4), k, np.float32).tobytes())
    response.parameters["triton_final_response"].bool_param = final
    return reply


class _Stream:
    """The decoupled step's ModelStreamInfer: RESPONSES responses, all ready at once."""

    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[pb.ModelStreamInferResponse]:
        for k in range(RESPONSES):
            yield _response(k, final=k == RESPONSES - 1)

    def cancel(self) -> None:
        self.cancelled = True


class _Gateway:
    def ModelStreamInfer(self, *args: Any, **kwargs: Any) -> _Stream:  # noqa: N802 (RPC name)
        return _Stream()


class _Add:
    """The plain step after it: slow enough that flows overlap; records the overlap."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0

    async def __call__(
        self, step: Step, tensors: Mapping[str, WireTensor], request: InferRequest
    ) -> dict[str, WireTensor]:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.running -= 1
        return {"OUT": tensors["MID"]}


async def _run(limit: int) -> tuple[int, list[float]]:
    config = decoupled(
        ensemble(
            step("stream", {"X": "IN"}, {"Z": "MID"})
            + ","
            + step("add", {"X": "MID"}, {"Z": "OUT"})
        )
    )
    config.ensemble_scheduling.max_inflight_requests = limit
    graph = build_graph(config, _lookup())
    assert graph.max_inflight_requests == limit
    add = _Add()
    runner = StreamingEnsemble(graph, add, _Gateway, lambda request, step: None)
    stream = ResponseStream()
    request = InferRequest("ens", "", {"IN": np.zeros((1, 4), np.float32)}, response_stream=stream)
    await runner.run(request, ["OUT"])
    seen = []
    while True:
        item = await stream.get()
        if item.outputs is not None:
            seen.append(float(item.outputs["OUT"][0, 0]))
        if item.final:
            return add.most, seen


@pytest.mark.parametrize("limit", [1, 2])
async def test_at_most_max_inflight_flows_run_at_once(limit: int) -> None:
    most, seen = await _run(limit)
    assert most == limit
    assert sorted(seen) == [float(k) for k in range(RESPONSES)]


async def test_without_a_limit_every_response_starts_its_flow_at_once() -> None:
    most, seen = await _run(0)
    assert most == RESPONSES
    assert sorted(seen) == [float(k) for k in range(RESPONSES)]
