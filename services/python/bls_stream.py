"""Decoupled BLS: ``exec(decoupled=True)`` and ``await async_exec(decoupled=True)`` as one
ModelStreamInfer call through the gateway.

As in Triton's Python backend, a BLS call with ``decoupled=True`` gives a ``ResponseIterator``:
one ``pb_utils.InferenceResponse`` per response the called model sends, in the order sent. The
last one may have no outputs (a decoupled model's bare FINAL flag) and ends the iteration; a model
that is not decoupled sends exactly one. A failure does not raise: it arrives as a response
carrying a ``TritonError`` (the stream's ``error_message``, or the call's gRPC status), and that
response is the last. Once finished, iterating again replays the responses (as Triton does).

Data flow: the request becomes the ModelInferRequest a unary BLS call sends (bls.build_request)
plus ``triton_enable_empty_final_response`` (so a bare FINAL flag arrives as an empty response)
and is the one message of a ModelStreamInfer call to the gateway, carrying the routing headers
(``meshserve-model`` / ``meshserve-version``) and the trace context of a CLIENT span that lasts
until the stream ends. The call starts when ``exec`` returns; responses wait in gRPC's buffers
until the model's code asks for them.

Threads: the call runs on the process's synchronous channel (bls.stub), so ``next()`` blocks
only the thread running ``execute``, never the service's event loop. ``async for`` waits for each
response in the running loop's default executor, so the other tasks of an ``async def execute``
go on; a plain ``for`` works there too, as in Triton.

Cancellation: ``cancel()`` (Triton's ``ResponseIterator.cancel``), dropping the iterator before
its last response, cancelling the task awaiting ``__anext__``, the deadline of the requests
being executed (bls.timeout_s) or all of them being cancelled (checked before each wait) cancel
the gRPC call, and with it the called model's request downstream.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Protocol

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from protos.gen.inference import grpc_service_pb2 as pb
from services.core import tracing
from services.core.dataplane import EMPTY_FINAL_PARAMETER, FINAL_PARAMETER
from services.core.gateway_client import routing_metadata
from services.python import bls
from services.python import triton_python_backend_utils as pb_utils

_tracer = trace.get_tracer("meshserve")


class StreamCall(Protocol):
    """What the iterator uses of a streaming call (grpc's response iterator is one)."""

    def __next__(self) -> pb.ModelStreamInferResponse: ...

    def cancel(self) -> bool: ...


def _parameter_value(param: pb.InferParameter) -> bool | int | float | str:
    choice = param.WhichOneof("parameter_choice")
    value: bool | int | float | str = getattr(param, choice) if choice else ""
    return value


def convert(message: pb.ModelStreamInferResponse) -> tuple[pb_utils.InferenceResponse, bool]:
    """One streamed message as a pb_utils response, and whether it is the request's last: an
    error, a response whose ``triton_final_response`` is true, or one without that parameter
    (the single response of a model that is not decoupled)."""
    if message.error_message:
        # the stream carries the error's text only; Triton's own default code is INTERNAL
        return bls.error_response(message.error_message, pb_utils.TritonError.INTERNAL), True
    reply = message.infer_response
    final = True
    if FINAL_PARAMETER in reply.parameters:
        final = reply.parameters[FINAL_PARAMETER].bool_param
    response = bls.parse_response(reply)
    if response.has_error():
        return response, True
    parameters = {
        key: _parameter_value(value)
        for key, value in reply.parameters.items()
        if key != FINAL_PARAMETER
    }
    if parameters:
        response = pb_utils.InferenceResponse(response.output_tensors(), parameters=parameters)
    return response, final


def _never() -> bool:
    return False


class ResponseIterator:
    """The responses of one decoupled BLS request (Triton's ``ResponseIterator``): iterate with
    ``for`` (blocking) or ``async for``; ``cancel()`` stops the request. Thread-safe."""

    def __init__(
        self,
        model: str,
        call: StreamCall | None,
        span: trace.Span | None = None,
        caller_cancelled: Callable[[], bool] = _never,
    ) -> None:
        self._model = model
        self._call = call
        self._span = span
        self._caller_cancelled = caller_cancelled
        self._cancel_reason = ""
        self._responses: list[pb_utils.InferenceResponse] = []
        #: the next response to replay (used once finished)
        self._index = 0
        self._finished = call is None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, response: pb_utils.InferenceResponse) -> ResponseIterator:
        """An iterator over one response at hand (a request that could not be sent)."""
        iterator = cls("", None)
        iterator._responses.append(response)
        return iterator

    # ---- sync ----------------------------------------------------------------------------------
    def __iter__(self) -> ResponseIterator:
        with self._lock:
            if self._finished and self._index >= len(self._responses):
                self._index = 0  # as Triton: a finished iterator iterates its responses again
        return self

    def __next__(self) -> pb_utils.InferenceResponse:
        with self._lock:
            if self._finished:
                if self._index >= len(self._responses):
                    raise StopIteration
                self._index += 1
                return self._responses[self._index - 1]
            response, final = self._receive()
            self._responses.append(response)
            self._index = len(self._responses)
            if final:
                self._finish(response)
            return response

    def _receive(self) -> tuple[pb_utils.InferenceResponse, bool]:
        """Wait for the next message (lock held; ``cancel`` does not take the lock)."""
        assert self._call is not None
        if self._caller_cancelled():
            self._stop("every request being executed was cancelled")
        try:
            return convert(next(self._call))
        except StopIteration:
            text = f"the response stream of model '{self._model}' ended before its final response"
            return bls.error_response(text, pb_utils.TritonError.INTERNAL), True
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._cancel_reason:
                text = f"BLS request to model '{self._model}' cancelled: {self._cancel_reason}"
                return bls.error_response(text, pb_utils.TritonError.CANCELLED), True
            return bls.rpc_error_response(exc, self._model), True

    def _finish(self, last: pb_utils.InferenceResponse) -> None:
        self._finished = True
        self._call = None
        error = last.error()
        if self._span is not None:
            if error is not None:
                tracing.set_error(self._span, error.message())
            self._span.end()

    def _stop(self, reason: str) -> None:
        call = self._call
        if call is not None and not self._finished:
            self._cancel_reason = reason
            call.cancel()

    def cancel(self) -> None:
        """Cancel the request: the called model sees it cancelled, and the next response (the
        last) is a CANCELLED error. Nothing happens once the last response arrived."""
        self._stop("cancel() was called")

    def __del__(self) -> None:
        # dropped before the last response: nobody will read the rest, so stop the request
        if getattr(self, "_call", None) is not None and not self._finished:
            self._stop("the iterator was dropped")
            if self._span is not None:
                self._span.end()

    # ---- async ---------------------------------------------------------------------------------
    def __aiter__(self) -> ResponseIterator:
        return self.__iter__()

    async def __anext__(self) -> pb_utils.InferenceResponse:
        if self._finished:
            response = self._next_or_none()
        else:
            waiting = asyncio.get_running_loop().run_in_executor(None, self._next_or_none)
            try:
                response = await waiting
            except asyncio.CancelledError:
                self._stop("the task waiting for its responses was cancelled")
                raise
        if response is None:
            raise StopAsyncIteration
        return response

    def _next_or_none(self) -> pb_utils.InferenceResponse | None:
        """``next(self)``, None at the end (a StopIteration cannot cross a future)."""
        try:
            return next(self)
        except StopIteration:
            return None


def execute(request: pb_utils.InferenceRequest) -> ResponseIterator:
    """Start a decoupled BLS request; its responses come from the iterator returned."""
    message = bls.prepare(request)
    if isinstance(message, pb_utils.InferenceResponse):
        return ResponseIterator.of(message)
    message.parameters[EMPTY_FINAL_PARAMETER].bool_param = True
    attributes = tracing.model_attributes(message.model_name, message.model_version, message.id)
    attributes.update({"rpc.system": "grpc", "rpc.method": "ModelStreamInfer"})
    span = _tracer.start_span(
        "BLS inference.GRPCInferenceService/ModelStreamInfer",
        kind=SpanKind.CLIENT,
        attributes=attributes,
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    metadata = routing_metadata(message.model_name, message.model_version) + list(carrier.items())
    call: StreamCall = bls.stub().ModelStreamInfer(
        iter((message,)), timeout=bls.timeout_s(request), metadata=metadata
    )
    return ResponseIterator(message.model_name, call, span, bls.current_caller().cancelled)


async def execute_async(request: pb_utils.InferenceRequest) -> ResponseIterator:
    """As :func:`execute`, for ``await request.async_exec(decoupled=True)`` (starting the call
    does not block)."""
    return execute(request)
