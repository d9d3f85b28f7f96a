"""One gRPC stream carrying requests for the models of every family, as Triton allows (the
model is named per request, tritonclient's ``async_stream_infer``). The gateway routes a stream
by its first message, so the service that gets it passes the other families' requests on
(services/core/stream_forward.py); each answer comes back on the stream under its request's id.
Stateful models keep their sums across the interleaved requests (their sequences are routed by
correlation ID), and a model the mesh does not have is NOT_FOUND on the stream, which goes on.
"""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.conformance.families import AVAILABLE
from tests.e2e.conformance.test_serving import grpc_inputs
from tests.e2e.conformance.test_stateful import values_for
from tests.e2e.conftest import MeshHandle


def _collect(answers: queue.Queue[tuple[Any, Any]], count: int) -> tuple[dict[str, Any], list[str]]:
    """``count`` answers of a stream: the results by request id, and the errors' texts."""
    got: dict[str, Any] = {}
    errors: list[str] = []
    for _ in range(count):
        result, error = answers.get(timeout=60)
        if error is not None:
            errors.append(str(error))
        else:
            got[result.get_response().id] = result
    return got, errors


def test_one_stream_serves_every_familys_models(mesh: MeshHandle) -> None:
    if len(AVAILABLE) < 2:
        pytest.skip("needs two families in the mesh")
    stateful = [f for f in AVAILABLE if f.sequence]
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    expected: dict[str, list[np.ndarray]] = {}
    sums: dict[str, int] = {}
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for round_ in range(3):
            for family in AVAILABLE:  # the first message decides where the stream goes
                inputs, total, diff = grpc_inputs(family, round_ + 1)
                rid = f"{family.name}:{round_}"
                client.async_stream_infer(family.model, inputs, request_id=rid)
                expected[rid] = [total, diff]
            for sid, family in enumerate(stateful, start=300):
                value = values_for(sid)[round_]
                tensor = grpcclient.InferInput(family.sequence_io[0], [1, 1], "INT32")
                tensor.set_data_from_numpy(np.array([[value]], np.int32))
                rid = f"{family.sequence}:{round_}"
                client.async_stream_infer(
                    family.sequence,
                    [tensor],
                    request_id=rid,
                    sequence_id=sid,
                    sequence_start=round_ == 0,
                    sequence_end=round_ == 2,
                )
                sums[rid] = int(np.cumsum(values_for(sid))[round_])
        client.async_stream_infer(
            "no_such_model", grpc_inputs(AVAILABLE[0], 1)[0], request_id="unknown"
        )
        got, errors = _collect(answers, len(expected) + len(sums) + 1)
    finally:
        client.stop_stream()
        client.close()
    assert len(errors) == 1 and "unknown model 'no_such_model'" in errors[0], errors
    assert set(got) == set(expected) | set(sums)
    for rid, (total, diff) in expected.items():
        family = next(f for f in AVAILABLE if rid.startswith(f"{f.name}:"))
        np.testing.assert_array_equal(got[rid].as_numpy(family.outputs[0]), total)
        np.testing.assert_array_equal(got[rid].as_numpy(family.outputs[1]), diff)
    for rid, total in sums.items():
        family = next(f for f in stateful if rid.startswith(f"{f.sequence}:"))
        assert int(got[rid].as_numpy(family.sequence_io[1])[0, 0]) == total, rid


def test_a_stream_that_starts_with_an_unknown_model_goes_on(mesh: MeshHandle) -> None:
    # the gateway sends such a stream to the control plane's front: it answers the unknown
    # model's request on the stream and pins the stream by the next message instead
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    expected: dict[str, np.ndarray] = {}
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("no_such_model", grpc_inputs(AVAILABLE[0], 1)[0], request_id="x")
        for family in AVAILABLE:
            inputs, total, _ = grpc_inputs(family, 2)
            client.async_stream_infer(family.model, inputs, request_id=family.name)
            expected[family.name] = total
        got, errors = _collect(answers, len(expected) + 1)
    finally:
        client.stop_stream()
        client.close()
    assert len(errors) == 1 and "unknown model 'no_such_model'" in errors[0], errors
    for family in AVAILABLE:
        np.testing.assert_array_equal(
            got[family.name].as_numpy(family.outputs[0]), expected[family.name]
        )
