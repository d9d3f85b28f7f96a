"""Decoupled BLS (services/python/bls_stream.py): streamed messages → pb_utils responses, and the
ResponseIterator against a real gRPC server standing in for the gateway.

``StreamingGateway`` is that stand-in (a fake: the real gateway needs the whole mesh, which
tests/e2e/test_python_bls.py runs). Its models: ``repeat_python`` (one response per IN element,
then an empty final one; a negative element ends the stream with an error, as the Python
service's stream does), ``single`` (one response, no final flag: a model that is not
decoupled), ``hang`` (one response, then nothing until the call ends).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from examples.build_python import build_python_repository
from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pb_grpc
from protos.gen.inference import model_config_pb2 as mc
from services.core import tracing
from services.core.config import apply_defaults, load_config_file
from services.core.dataplane import EMPTY_FINAL_PARAMETER, FINAL_PARAMETER
from services.core.decoupled import ResponseStream
from services.core.errors import InternalError
from services.core.requests import InferRequest
from services.core.runtime import InstanceSpec
from services.python import bls
from services.python import triton_python_backend_utils as pb_utils
from services.python.bls_stream import ResponseIterator, convert
from services.python.runtime import PythonRuntime
from tests.fake_gateway import serving_as_gateway

CPU = InstanceSpec(name="m_0", kind=mc.ModelInstanceGroup.KIND_CPU)


def _infer_response(values: list[int] | None, final: bool | None) -> pb.ModelInferResponse:
    reply = pb.ModelInferResponse(model_name="repeat_python", id="r")
    if values is not None:
        reply.outputs.add(name="OUT", datatype="INT32", shape=[len(values)])
        reply.raw_output_contents.append(np.array(values, np.int32).tobytes())
    if final is not None:
        reply.parameters[FINAL_PARAMETER].bool_param = final
    return reply


def _stream_message(values: list[int] | None, final: bool | None) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(infer_response=_infer_response(values, final))


def _out(response: pb_utils.InferenceResponse) -> list[int]:
    tensor = pb_utils.get_output_tensor_by_name(response, "OUT")
    assert tensor is not None
    return [int(v) for v in tensor.as_numpy()]


# --- convert ----------------------------------------------------------------------------------
def test_a_response_before_the_last_is_not_final() -> None:
    response, final = convert(_stream_message([7], final=False))
    assert not final and not response.has_error()
    assert _out(response) == [7]


def test_the_empty_final_response_is_yielded_and_ends_the_stream() -> None:
    response, final = convert(_stream_message(None, final=True))
    assert final and not response.has_error() and response.output_tensors() == []


def test_a_response_without_the_final_flag_is_the_only_one() -> None:
    response, final = convert(_stream_message([1, 2], final=None))
    assert final and _out(response) == [1, 2]


def test_an_error_message_becomes_a_final_triton_error() -> None:
    message = pb.ModelStreamInferResponse(
        error_message="IN[1] is -2; repeat takes non-negative values",
        infer_response=pb.ModelInferResponse(model_name="repeat_python"),
    )
    response, final = convert(message)
    error = response.error()
    assert final and error is not None and response.output_tensors() == []
    assert error.code() == pb_utils.TritonError.INTERNAL
    assert error.message() == "IN[1] is -2; repeat takes non-negative values"


def test_response_parameters_are_kept_but_the_final_marker() -> None:
    message = _stream_message([3], final=False)
    params = message.infer_response.parameters
    params["tokens"].int64_param = 4
    params["label"].string_param = "x"
    response, _ = convert(message)
    assert json.loads(response.parameters()) == {"tokens": 4, "label": "x"}


def test_a_malformed_response_is_a_final_error() -> None:
    message = _stream_message([3], final=False)
    message.infer_response.raw_output_contents.append(b"extra")
    response, final = convert(message)
    error = response.error()
    assert final and error is not None and "expected one per output" in error.message()


# --- against a server -------------------------------------------------------------------------
class StreamingGateway(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[pb.ModelInferRequest] = []
        self.metadata: list[dict[str, str]] = []
        #: set when a ModelStreamInfer call ends (completed, cancelled or past its deadline)
        self.ended = threading.Event()

    def ModelStreamInfer(  # noqa: N802 (the generated servicer's method name)
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        context.add_callback(self.ended.set)
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        for request in request_iterator:
            self.requests.append(request)
            values = [int(v) for v in np.frombuffer(request.raw_input_contents[0], np.int32)]
            if request.model_name == "single":
                yield _stream_message(values, final=None)
            elif request.model_name == "hang":
                yield _stream_message(values[:1], final=False)
                self.ended.wait(10)
            elif request.model_name == "repeat_python":
                yield from self._repeat(request, values)
            else:
                context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model: '{request.model_name}'")

    def _repeat(
        self, request: pb.ModelInferRequest, values: list[int]
    ) -> Iterator[pb.ModelStreamInferResponse]:
        for index, value in enumerate(values):
            if value < 0:
                yield pb.ModelStreamInferResponse(
                    error_message=f"IN[{index}] is {value}; repeat takes non-negative values"
                )
                return
            yield _stream_message([value], final=False)
        if request.parameters[EMPTY_FINAL_PARAMETER].bool_param:
            yield _stream_message(None, final=True)

    def ModelInfer(  # noqa: N802
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        # the Python service's answer to a unary call to a decoupled model
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"model '{request.model_name}' is decoupled (it may send any number of responses): "
            "call it with ModelStreamInfer (tritonclient: start_stream + async_stream_infer)",
        )


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[StreamingGateway]:
    fake = StreamingGateway()
    with serving_as_gateway(fake, monkeypatch):
        yield fake


def _request(model: str, values: list[int], model_version: int = -1) -> pb_utils.InferenceRequest:
    tensor = pb_utils.Tensor("IN", np.array(values, np.int32))
    return pb_utils.InferenceRequest(model, [tensor], ["OUT"], model_version=model_version)


def _iterator(request: pb_utils.InferenceRequest) -> ResponseIterator:
    responses = request.exec(decoupled=True)
    assert isinstance(responses, ResponseIterator)
    return responses


def test_exec_decoupled_yields_each_response_then_the_empty_final(
    gateway: StreamingGateway,
) -> None:
    responses = list(_iterator(_request("repeat_python", [5, 6, 7], model_version=2)))
    assert [_out(r) for r in responses[:3]] == [[5], [6], [7]]
    assert len(responses) == 4 and responses[3].output_tensors() == []
    assert not any(r.has_error() for r in responses)
    (sent,) = gateway.requests
    assert sent.parameters[EMPTY_FINAL_PARAMETER].bool_param
    assert gateway.metadata[0]["meshserve-model"] == "repeat_python"
    assert gateway.metadata[0]["meshserve-version"] == "2"


def test_the_stream_carries_the_executing_requests_trace(gateway: StreamingGateway) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = tracing.extract_context({"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    with tracing.attached(parent):
        list(_iterator(_request("single", [1])))
    assert gateway.metadata[0]["traceparent"].split("-")[1] == trace_id


def test_a_finished_iterator_replays_its_responses(gateway: StreamingGateway) -> None:
    responses = _iterator(_request("repeat_python", [1, 2]))
    first = [_out(r) for r in list(responses)[:2]]
    assert [_out(r) for r in list(responses)[:2]] == first == [[1], [2]]
    assert len(gateway.requests) == 1


def test_a_model_that_is_not_decoupled_yields_its_one_response(
    gateway: StreamingGateway,
) -> None:
    responses = list(_iterator(_request("single", [4, 2])))
    assert len(responses) == 1 and _out(responses[0]) == [4, 2]
    assert "meshserve-version" not in gateway.metadata[0]


def test_an_error_in_the_stream_is_the_last_response(gateway: StreamingGateway) -> None:
    responses = list(_iterator(_request("repeat_python", [1, -2, 3])))
    assert len(responses) == 2 and _out(responses[0]) == [1]
    error = responses[1].error()
    assert error is not None and "IN[1] is -2" in error.message()


def test_a_failed_call_is_one_error_response(gateway: StreamingGateway) -> None:
    (missing,) = list(_iterator(_request("nope", [1])))
    error = missing.error()
    assert error is not None and error.code() == pb_utils.TritonError.NOT_FOUND
    (unnamed,) = list(_iterator(_request("", [1])))
    assert unnamed.has_error() and len(gateway.requests) == 1


def test_unary_exec_of_a_decoupled_model_says_to_use_decoupled(
    gateway: StreamingGateway,
) -> None:
    response = _request("repeat_python", [1]).exec()
    assert isinstance(response, pb_utils.InferenceResponse)
    error = response.error()
    assert error is not None and error.code() == pb_utils.TritonError.INVALID_ARG
    assert "model 'repeat_python' uses the decoupled transaction policy" in error.message()
    assert "exec(decoupled=True)" in error.message()


def test_cancel_stops_the_call(gateway: StreamingGateway) -> None:
    responses = _iterator(_request("hang", [9]))
    assert _out(next(responses)) == [9]
    responses.cancel()
    last = next(responses)
    error = last.error()
    assert error is not None and error.code() == pb_utils.TritonError.CANCELLED
    assert "cancel() was called" in error.message()
    assert gateway.ended.wait(5)
    assert list(responses)[-1] is last


def test_dropping_the_iterator_cancels_the_call(gateway: StreamingGateway) -> None:
    responses = _iterator(_request("hang", [9]))
    next(responses)
    del responses
    assert gateway.ended.wait(5)


def test_the_executing_requests_deadline_bounds_the_stream(gateway: StreamingGateway) -> None:
    deadline = time.monotonic_ns() + 300_000_000
    caller = InferRequest("caller", "", {}, deadline_ns=deadline)
    with bls.executing_for([caller]):
        responses = list(_iterator(_request("hang", [9])))
    error = responses[-1].error()
    assert error is not None and error.code() == pb_utils.TritonError.UNAVAILABLE
    assert time.monotonic_ns() < deadline + 5_000_000_000


def test_cancelled_executing_requests_cancel_the_stream(gateway: StreamingGateway) -> None:
    async def stream() -> ResponseStream:
        return ResponseStream()

    caller = InferRequest("caller", "", {}, response_stream=asyncio.run(stream()))
    with bls.executing_for([caller]):
        responses = _iterator(_request("hang", [9]))
    next(responses)
    assert caller.response_stream is not None
    caller.response_stream.cancel()
    error = next(responses).error()
    assert error is not None and "every request being executed was cancelled" in error.message()
    assert gateway.ended.wait(5)


def test_async_exec_decoupled_iterates_with_async_for(gateway: StreamingGateway) -> None:
    async def collect() -> list[list[int]]:
        requests = [_request("repeat_python", [1, 2]), _request("repeat_python", [3])]
        iterators = await asyncio.gather(*(r.async_exec(decoupled=True) for r in requests))
        collected = []
        for responses in iterators:
            assert isinstance(responses, ResponseIterator)
            values: list[int] = []
            async for response in responses:
                if response.output_tensors():  # the last one is empty
                    values += _out(response)
            collected.append(values)
        return collected

    assert asyncio.run(collect()) == [[1, 2], [3]]


def test_cancelling_the_waiting_task_cancels_the_call(gateway: StreamingGateway) -> None:
    async def cancel_while_waiting() -> None:
        responses = await _request("hang", [9]).async_exec(decoupled=True)
        assert isinstance(responses, ResponseIterator)
        await anext(responses)
        waiting = asyncio.ensure_future(anext(responses))
        await asyncio.sleep(0)  # let it start waiting
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        # the iterator is still referenced: the cancelled task, not a drop, ended the call
        assert gateway.ended.wait(5)

    asyncio.run(cancel_while_waiting())


# --- the example model, run by PythonRuntime --------------------------------------------------
@pytest.fixture
def example(tmp_path: Path) -> Iterator[PythonRuntime]:
    build_python_repository(tmp_path, ["bls_decoupled_python"])
    folder = tmp_path / "bls_decoupled_python"
    config = load_config_file(folder / "config.pbtxt")
    apply_defaults(config)
    runtime = PythonRuntime(config, folder / "1" / "model.py", CPU)
    yield runtime
    runtime.unload()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_example_joins_what_repeat_streamed(
    gateway: StreamingGateway, example: PythonRuntime, mode: str
) -> None:
    request = InferRequest(
        "bls_decoupled_python",
        "",
        {"IN": np.array([4, 0, 9], np.int32)},
        parameters={"bls_mode": mode},
    )
    (result,) = example.infer_requests([request], ["OUT", "RESPONSES"])
    assert not isinstance(result, Exception)
    np.testing.assert_array_equal(result["OUT"], np.array([4, 0, 9], np.int32))
    assert int(result["RESPONSES"][0]) == 4  # three, then the empty final one


@pytest.mark.parametrize(
    ("values", "mode", "text"),
    [
        ([1, -2], "sync", "failed after 1 responses: IN[1] is -2"),
        ([1], "unary", "uses the decoupled transaction policy"),
    ],
)
def test_example_reports_the_bls_error(
    gateway: StreamingGateway, example: PythonRuntime, values: list[int], mode: str, text: str
) -> None:
    request = InferRequest(
        "bls_decoupled_python",
        "",
        {"IN": np.array(values, np.int32)},
        parameters={"bls_mode": mode},
    )
    (result,) = example.infer_requests([request], ["OUT", "RESPONSES"])
    assert isinstance(result, InternalError) and text in result.message
