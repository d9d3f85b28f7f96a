"""Decoupled ensembles: one request, a stream of ensemble responses (services/ensemble/graph.py
has Triton's rules and where they come from).

A request runs as *flows*. The first flow runs the steps of origin None on the request's inputs.
A decoupled step is one ModelStreamInfer call through the gateway (routing headers, trace
context, the request's deadline); each response it sends starts a new flow on that response's
tensors alone, running the steps whose origin is that decoupled step (a decoupled step among
them starts flows of its own). Inside a flow, steps run as in the plain runtime: each as soon as
what it reads exists, independent ones concurrently. A flow of the outputs' origin that has all
the ensemble outputs sends them as one response through the request's ResponseStream (which
services/core/dataplane.infer_stream turns into ModelStreamInfer responses).

With ``ensemble_scheduling.max_inflight_requests`` N > 0 (Triton's backpressure for decoupled
steps), a decoupled step starts no more than N flows at once per request: its next response is
read only when one of its flows ended, so a step that produces faster than the steps after it
consume waits (gRPC flow control then holds back its service) instead of piling up flows.

As in Triton's ensemble scheduler, ensemble responses leave in the order their flows finish, not
necessarily in the order the decoupled step sent its responses (the ensemble's ``IDX``-like
outputs say which is which). The FINAL flag goes with the last response when nothing else is in
flight at that moment, or alone afterwards (a decoupled step that sent no response gives a bare
FINAL flag, as Triton sends). The first failing step fails the request with a message naming the
step; everything else in flight is cancelled, as are all calls when the caller goes away.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Mapping, Sequence

import grpc
from opentelemetry.trace import SpanKind

from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from services.core import tracing
from services.core.dataplane import EMPTY_FINAL_PARAMETER, FINAL_PARAMETER
from services.core.decoupled import ResponseStream, StreamItem
from services.core.errors import InternalError, ServingError, error_for_status
from services.core.gateway_client import (
    WireTensor,
    infer_message,
    response_tensors,
    routing_metadata,
)
from services.core.requests import Array, InferRequest
from services.ensemble.dataflow import run_dataflow
from services.ensemble.graph import EnsembleGraph, Step

#: runs one single-response step (EnsembleRuntime's ModelInfer through the gateway)
CallStep = Callable[
    [Step, Mapping[str, WireTensor], InferRequest], Awaitable[dict[str, WireTensor]]
]
#: seconds left before the request's deadline when ``step`` starts (None: no deadline)
StepTimeout = Callable[[InferRequest, Step], "float | None"]


class StreamingEnsemble:
    """Runs requests of one decoupled ensemble (created once per loaded ensemble)."""

    def __init__(
        self,
        graph: EnsembleGraph,
        call_step: CallStep,
        gateway: Callable[[], pbg.GRPCInferenceServiceStub],
        timeout: StepTimeout,
    ) -> None:
        self.graph = graph
        self._call_step = call_step
        self._gateway = gateway
        self._timeout = timeout
        #: origin → its steps, in dependency order
        self._steps: dict[int | None, tuple[Step, ...]] = {}
        for step in graph.steps:
            self._steps[step.origin] = (*self._steps.get(step.origin, ()), step)

    async def run(self, request: InferRequest, outputs: Sequence[str]) -> dict[str, Array]:
        """Send every ensemble response, then the FINAL flag, through the request's stream;
        returns no outputs (they went to the stream)."""
        stream = request.response_stream
        if stream is None:
            raise InternalError(
                f"ensemble '{self.graph.name}' is decoupled: it answers through a response "
                "stream (call it with ModelStreamInfer)"
            )
        tensors = {
            name: WireTensor.from_array(self.graph.input_types[name], array)
            for name, array in request.inputs.items()
        }
        run = _Run(self, request, stream, outputs)
        try:
            async with asyncio.TaskGroup() as group:
                run.group = group
                run.start(None, tensors, contextvars.copy_context())
        except BaseExceptionGroup as failed:
            raise _first_error(failed) from None
        if not run.final_sent:
            stream.send(StreamItem(None, None, final=True))
        return {}


class _Run:
    """The flows and streaming steps of one request, all tasks of one TaskGroup."""

    def __init__(
        self,
        ensemble: StreamingEnsemble,
        request: InferRequest,
        stream: ResponseStream,
        outputs: Sequence[str],
    ) -> None:
        self.ensemble = ensemble
        self.graph = ensemble.graph
        self.request = request
        self.stream = stream
        self.outputs = outputs
        self.group: asyncio.TaskGroup | None = None
        #: flows and streaming steps started and not finished
        self.live = 0
        self.final_sent = False

    def start(
        self,
        origin: int | None,
        tensors: dict[str, WireTensor],
        ctx: contextvars.Context,
        slot: asyncio.Semaphore | None = None,
    ) -> None:
        """A flow (in the request's trace context ``ctx``) running the steps of ``origin``;
        it releases ``slot`` (acquired by the caller) when it ends."""
        assert self.group is not None
        self.live += 1
        self.group.create_task(self._counted(self._flow(origin, tensors), slot), context=ctx)

    async def _counted(self, work: Awaitable[None], slot: asyncio.Semaphore | None = None) -> None:
        try:
            await work
        finally:
            self.live -= 1
            if slot is not None:
                slot.release()

    async def _flow(self, origin: int | None, tensors: dict[str, WireTensor]) -> None:
        waiting = list(self.ensemble._steps.get(origin, ()))
        running: dict[asyncio.Task[dict[str, WireTensor]], Step] = {}

        def launch_ready() -> None:
            for step in [s for s in waiting if s.reads <= tensors.keys()]:
                waiting.remove(step)
                if step.decoupled:
                    assert self.group is not None
                    self.live += 1
                    self.group.create_task(self._counted(self._stream_step(step, tensors)))
                else:
                    call = self.ensemble._call_step(step, tensors, self.request)
                    running[asyncio.ensure_future(call)] = step

        await run_dataflow(running, tensors, launch_ready)
        if origin == self.graph.output_origin and all(o in tensors for o in self.outputs):
            self._respond(tensors)

    def _respond(self, tensors: Mapping[str, WireTensor]) -> None:
        name = self.graph.name
        values = {o: tensors[o].array(f"ensemble '{name}' output '{o}'") for o in self.outputs}
        # this flow is the last work in flight: nothing can follow, so this response is the last
        final = self.live == 1
        self.stream.send(StreamItem(values, None, final=final))
        self.final_sent = final

    async def _stream_step(self, step: Step, tensors: Mapping[str, WireTensor]) -> None:
        """Call a decoupled step; each of its responses starts a flow of the steps after it."""
        name = self.graph.name
        message = infer_message(
            step.model_name,
            step.model_version,
            {model_input: tensors[tensor] for model_input, tensor in step.inputs},
            [model_output for model_output, _ in step.outputs],
            self.request.id,
        )
        message.parameters[EMPTY_FINAL_PARAMETER].bool_param = True
        timeout = self.ensemble._timeout(self.request, step)
        # the flows started by the responses belong to the request's trace, not to this call
        request_ctx = contextvars.copy_context()
        attributes = tracing.model_attributes(step.model_name, step.model_version, self.request.id)
        attributes.update({"meshserve.ensemble": name, "meshserve.ensemble.step": step.index})
        with tracing.child_span(
            f"ensemble step {step.index}: {step.model_name}", attributes, SpanKind.CLIENT
        ) as span:
            metadata = routing_metadata(step.model_name, step.model_version)
            metadata += tracing.inject_metadata()
            call = self.ensemble._gateway().ModelStreamInfer(
                iter((message,)), timeout=timeout, metadata=tuple(metadata)
            )
            limit = self.graph.max_inflight_requests
            slot = asyncio.Semaphore(limit) if limit > 0 else None
            try:
                async for reply in call:
                    final, child = self._take(step, reply)
                    if child is not None:
                        if slot is not None:
                            await slot.acquire()  # backpressure: read on once a flow ended
                        self.start(step.index, child, request_ctx, slot)
                    if final:
                        return
            except grpc.aio.AioRpcError as exc:
                error = error_for_status(
                    exc.code(), f"ensemble '{name}' {step.label} failed: {exc.details()}"
                )
                tracing.set_error(span, error.message)
                raise error from None
            except ServingError as err:
                tracing.set_error(span, err.message)
                raise
            finally:
                call.cancel()
        raise InternalError(
            f"ensemble '{name}' {step.label}: the response stream ended before its final response"
        )

    def _take(
        self, step: Step, reply: pb.ModelStreamInferResponse
    ) -> tuple[bool, dict[str, WireTensor] | None]:
        """Whether one streamed response was the last, and the tensors of the flow it starts
        (None: a response without outputs, e.g. a bare FINAL flag)."""
        source = f"ensemble '{self.graph.name}' {step.label}"
        if reply.error_message:
            # a stream carries the error's text only (Triton's default code: INTERNAL)
            raise InternalError(f"{source} failed: {reply.error_message}")
        response = reply.infer_response
        final = True
        if FINAL_PARAMETER in response.parameters:
            final = response.parameters[FINAL_PARAMETER].bool_param
        if not response.outputs:
            return final, None
        try:
            produced = response_tensors(response, source)
        except ServingError as err:
            raise InternalError(err.message) from None
        missing = [o for o, _ in step.outputs if o not in produced]
        if missing:
            raise InternalError(f"{source} answered without outputs {missing}")
        return final, {tensor: produced[model_output] for model_output, tensor in step.outputs}


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that failed the request (the first a task raised; the others were cancelled)."""
    first: BaseException = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
