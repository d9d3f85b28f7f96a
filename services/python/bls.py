"""BLS (business logic scripting): a Python model calling other models in the mesh.

``pb_utils.InferenceRequest(...).exec()`` / ``async_exec()`` land here. The request becomes a
KServe v2 ``ModelInferRequest`` (every tensor in ``raw_input_contents``: numeric types as raw
little-endian bytes, BYTES length-prefixed) and is routed as the gateway would route it, by the
gateway's own routes (services/core/mesh_caller.py, as ensemble steps are): splits, retries and
load balancing apply exactly as to a client's call, and the call goes straight to the replica the
routes pick. The call runs on the service's event loop (over its grpc_front) while the model's
thread waits for it. Where no service loop runs (a model driven outside a server) or the model
runs on that loop's own thread, the call goes over a plain gRPC channel to the gateway
(``MESHSERVE_GATEWAY``, ``host:port``; the supervisor sets it, default ``127.0.0.1:8001``), one
per process and address. Calls to decoupled models (``exec(decoupled=True)``) stream their
responses through the gateway: services/python/bls_stream.py.

Following Triton's Python backend, a failed call does not raise: the returned
``InferenceResponse`` carries a ``TritonError`` (``has_error()`` / ``error()``) whose code is the
gRPC status translated to Triton's error codes. Each call is a CLIENT span under the executing
request's span and carries the trace context (``traceparent``) and the gateway's routing headers.

A call's deadline is the request's ``timeout`` (default ``DEFAULT_TIMEOUT_S``), cut to what is
left of the deadline of the requests ``execute`` is running (``executing_for``, set by the
runtime), so a BLS call never outlives the client waiting for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from opentelemetry.trace import SpanKind

from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pb_grpc
from services.core import dtypes, mesh_caller, tracing
from services.core.errors import ServingError
from services.core.front_calls import CallFailed
from services.core.gateway_client import CHANNEL_OPTIONS, gateway_address, routing_metadata
from services.core.requests import InferRequest
from services.python import triton_python_backend_utils as pb_utils

#: deadline of a BLS call whose request sets no ``timeout``
DEFAULT_TIMEOUT_S = 60.0
#: how long past its deadline a call on the service's loop may take to report it
RESULT_GRACE_S = 1.0

_CODE_BY_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.NOT_FOUND: pb_utils.TritonError.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: pb_utils.TritonError.INVALID_ARG,
    grpc.StatusCode.UNAVAILABLE: pb_utils.TritonError.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: pb_utils.TritonError.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: pb_utils.TritonError.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED: pb_utils.TritonError.UNSUPPORTED,
    grpc.StatusCode.ALREADY_EXISTS: pb_utils.TritonError.ALREADY_EXISTS,
    grpc.StatusCode.CANCELLED: pb_utils.TritonError.CANCELLED,
}

_stubs: dict[str, pb_grpc.GRPCInferenceServiceStub] = {}
_stubs_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Caller:
    """The requests an ``execute`` call is running, as its BLS calls see them: the latest
    deadline among them (``time.monotonic_ns()``; 0: one of them has none) and whether every
    one of them was cancelled (their clients stopped listening)."""

    deadline_ns: int = 0
    cancelled: Callable[[], bool] = lambda: False
    #: told of every BLS call made (the runtime stops running this model on the event loop)
    calling: Callable[[], None] = lambda: None


_caller: ContextVar[Caller | None] = ContextVar("meshserve_bls_caller", default=None)


@contextlib.contextmanager
def executing_for(
    requests: Sequence[InferRequest], calling: Callable[[], None] = lambda: None
) -> Iterator[None]:
    """Make BLS calls in this block (this thread, and the tasks of an ``async def execute`` run
    in it) bounded by the deadline of ``requests`` and stopped once all of them are cancelled;
    ``calling`` is told of each call."""
    deadlines = [r.deadline_ns for r in requests]
    streams = [r.response_stream for r in requests]

    def cancelled() -> bool:
        return bool(streams) and all(s is not None and s.cancelled for s in streams)

    token = _caller.set(Caller(max(deadlines) if all(deadlines) else 0, cancelled, calling))
    try:
        yield
    finally:
        _caller.reset(token)


def current_caller() -> Caller:
    """The requests the running ``execute`` serves (a Caller without limits outside one)."""
    return _caller.get() or Caller()


def stub() -> pb_grpc.GRPCInferenceServiceStub:
    """The process's stub for the current gateway address (channel created once, then reused)."""
    address = gateway_address()
    with _stubs_lock:
        stub = _stubs.get(address)
        if stub is None:
            channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
            stub = _stubs[address] = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        return stub


def _set_parameter(param: pb.InferParameter, value: object) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        param.string_param = json.dumps(value)


def build_request(request: pb_utils.InferenceRequest) -> pb.ModelInferRequest:
    """The v2 protocol form of a BLS request (raises TritonModelException on a bad tensor)."""
    version = request.model_version()
    message = pb.ModelInferRequest(
        model_name=request.model_name(),
        model_version="" if version < 0 else str(version),
        id=request.request_id(),
    )
    for tensor in request.inputs():
        array = tensor.as_numpy()
        datatype = dtypes.name_of_numpy(array.dtype)
        if datatype is None:
            raise pb_utils.TritonModelException(
                f"BLS input '{tensor.name()}' has numpy dtype {array.dtype}, which has no Triton "
                "datatype; cast it (e.g. .astype(np.float32))"
            )
        # the data travels in raw_input_contents, in input order
        message.inputs.add(name=tensor.name(), datatype=datatype, shape=array.shape)
        message.raw_input_contents.append(dtypes.tensor_bytes(datatype, array))
    for name in request.requested_output_names():
        message.outputs.add(name=name)
    params: dict[str, Any] = json.loads(request.parameters() or "{}")
    for key, value in params.items():
        _set_parameter(message.parameters[key], value)
    correlation_id = request.correlation_id()
    if isinstance(correlation_id, str) and correlation_id:
        message.parameters["sequence_id"].string_param = correlation_id
    elif correlation_id:
        message.parameters["sequence_id"].int64_param = correlation_id
    flags = request.flags()
    if flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
        message.parameters["sequence_start"].bool_param = True
    if flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END:
        message.parameters["sequence_end"].bool_param = True
    return message


def parse_response(message: pb.ModelInferResponse) -> pb_utils.InferenceResponse:
    """A v2 protocol response as ``pb_utils.InferenceResponse`` (raw output contents only)."""
    if len(message.raw_output_contents) != len(message.outputs):
        return error_response(
            f"BLS response from '{message.model_name}' has {len(message.outputs)} outputs but "
            f"{len(message.raw_output_contents)} raw_output_contents; expected one per output",
            pb_utils.TritonError.INTERNAL,
        )
    tensors = []
    try:
        for output, raw in zip(message.outputs, message.raw_output_contents, strict=True):
            datatype = dtypes.lookup(output.datatype, f"output '{output.name}'")
            shape = tuple(int(d) for d in output.shape)
            if datatype.byte_size == 0:
                array = dtypes.deserialize_bytes(raw, math.prod(shape), f"output '{output.name}'")
            else:
                array = np.frombuffer(raw, dtype=datatype.numpy)
            tensors.append(pb_utils.Tensor(output.name, array.reshape(shape)))
    except (ServingError, ValueError) as exc:
        return error_response(
            f"BLS response from '{message.model_name}': {exc}", pb_utils.TritonError.INTERNAL
        )
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error_response(message: str, code: int) -> pb_utils.InferenceResponse:
    """A response carrying only a ``TritonError``."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def rpc_error_response(exc: grpc.RpcError, model: str) -> pb_utils.InferenceResponse:
    """The error response of a failed gRPC call to ``model`` through the gateway."""
    status: grpc.StatusCode = exc.code()
    details: str = exc.details() or status.name
    if status == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
        details = f"cannot reach the gateway at {gateway_address()} ({details})"
    return status_error_response(status, details, model)


def status_error_response(
    status: grpc.StatusCode, details: str, model: str
) -> pb_utils.InferenceResponse:
    """The error response of a call to ``model`` that ended with ``status`` (→ Triton's code)."""
    details = details or status.name
    code = _CODE_BY_STATUS.get(status, pb_utils.TritonError.INTERNAL)
    if status == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
        details = f"cannot reach a service serving '{model}' ({details})"
    elif status == grpc.StatusCode.INVALID_ARGUMENT and f"'{model}' is decoupled" in details:
        # what Triton answers a BLS call with decoupled=False to a decoupled model
        details = (
            f"model '{model}' uses the decoupled transaction policy: a BLS request to it must "
            "use exec(decoupled=True) or async_exec(decoupled=True), which return an iterator "
            "of its responses"
        )
    return error_response(details, code)


def timeout_s(request: pb_utils.InferenceRequest) -> float:
    """Seconds the call may take: Triton's ``timeout`` (microseconds; 0: ``DEFAULT_TIMEOUT_S``),
    at most what is left until the executing requests' deadline."""
    micros = request.timeout()
    timeout = micros / 1e6 if micros > 0 else DEFAULT_TIMEOUT_S
    deadline_ns = current_caller().deadline_ns
    if deadline_ns:
        timeout = min(timeout, max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9))
    return timeout


def prepare(
    request: pb_utils.InferenceRequest,
) -> pb.ModelInferRequest | pb_utils.InferenceResponse:
    """The request's v2 form, or the error response explaining why it cannot be sent."""
    current_caller().calling()
    if not request.model_name():
        return error_response("BLS request names no model_name", pb_utils.TritonError.INVALID_ARG)
    try:
        return build_request(request)
    except pb_utils.TritonModelException as exc:
        return error_response(str(exc), pb_utils.TritonError.INVALID_ARG)


def execute(request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
    """Run a BLS request, blocking the calling thread until its response arrives."""
    message = prepare(request)
    if isinstance(message, pb_utils.InferenceResponse):
        return message
    timeout = timeout_s(request)
    with _client_span(message) as span:
        metadata = _metadata(message)
        future = mesh_caller.submit(gateway_address(), "bls", message, metadata, timeout)
        try:
            if future is None:
                reply = stub().ModelInfer(message, timeout=timeout, metadata=metadata)
            else:
                reply = future.result(timeout + RESULT_GRACE_S)
        except grpc.RpcError as exc:
            tracing.set_error(span, f"{exc.code().name}: {exc.details()}")
            return rpc_error_response(exc, message.model_name)
        except CallFailed as failed:
            tracing.set_error(span, f"{failed.code.name}: {failed.details}")
            return status_error_response(failed.code, failed.details, message.model_name)
        except concurrent.futures.TimeoutError:
            assert future is not None  # the gRPC stub raises RpcError on its deadline
            future.cancel()
            tracing.set_error(span, "DEADLINE_EXCEEDED")
            return status_error_response(
                grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", message.model_name
            )
    return parse_response(reply)


async def execute_async(request: pb_utils.InferenceRequest) -> pb_utils.InferenceResponse:
    """Run a BLS request without blocking the running event loop (cancelling cancels the call)."""
    message = prepare(request)
    if isinstance(message, pb_utils.InferenceResponse):
        return message
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    timeout = timeout_s(request)
    with _client_span(message) as span:
        metadata = _metadata(message)
        future = mesh_caller.submit(gateway_address(), "bls", message, metadata, timeout)
        if future is not None:
            try:
                reply = await asyncio.wrap_future(future)  # cancelling this cancels the call
            except CallFailed as failed:
                tracing.set_error(span, f"{failed.code.name}: {failed.details}")
                return status_error_response(failed.code, failed.details, message.model_name)
            return parse_response(reply)
        call = stub().ModelInfer.future(message, timeout=timeout, metadata=metadata)
        call.add_done_callback(lambda _: loop.call_soon_threadsafe(settle))
        try:
            await done
        except asyncio.CancelledError:
            call.cancel()
            raise
        try:
            reply = call.result()
        except grpc.RpcError as exc:
            tracing.set_error(span, f"{exc.code().name}: {exc.details()}")
            return rpc_error_response(exc, message.model_name)
    return parse_response(reply)


def _metadata(message: pb.ModelInferRequest) -> list[tuple[str, str]]:
    """The call's metadata: the gateway's routing headers and the current trace context."""
    routing = routing_metadata(message.model_name, message.model_version)
    return routing + tracing.inject_metadata()


def _client_span(message: pb.ModelInferRequest) -> contextlib.AbstractContextManager[tracing.Span]:
    """A CLIENT span around one BLS call, child of the executing request's span; the call
    carries it as its ``traceparent``."""
    attributes = tracing.model_attributes(message.model_name, message.model_version, message.id)
    attributes.update({"rpc.system": "grpc", "rpc.method": "ModelInfer"})
    return tracing.child_span(
        "BLS inference.GRPCInferenceService/ModelInfer", attributes, SpanKind.CLIENT
    )
