"""Triton ensembles (``platform: "ensemble"``) run as chained ModelInfer calls across the mesh.

One request of an ensemble is a small dataflow run on the event loop: every step whose input
tensors exist is called at once (steps without a dependency between them run concurrently),
each step is a gRPC ModelInfer routed by the gateway's own routes (services/core/mesh_caller.py:
the control plane's route table followed over ADS, so splits, retries and load balancing apply
to steps too, and the call goes straight to the replica the routes pick, without the gateway
hop; without ``MESHSERVE_XDS`` it goes through the gateway), and its outputs become tensors for
the steps after it. Tensors stay in wire form between steps (the bytes a step's response brought
are the bytes the next step's request sends). The caller's gRPC deadline bounds every step;
cancelling the request (the caller gave up) cancels the steps in flight, which cancels their
calls downstream. The first failing step fails the request with its status and a message naming
the step and its model; the other steps in flight are cancelled.

The config parameter ``step_routing`` picks the path per ensemble: ``mesh`` (the default, as
above) or ``gateway`` (every step through the gateway, e.g. to have Envoy's own stats and spans
for each step, or its request mirroring).

Step calls carry the gateway's routing headers (``meshserve-model``, and ``meshserve-version``
when the step pins one): the routes match on them (and Envoy, where a call goes through it,
routes without reading the body). Each step call is a client span (the request's server span its
parent) and carries the W3C trace context, so the step's services continue the same trace.

An ensemble with a decoupled step is decoupled itself (set at load by ``autocomplete``, as Triton
does) and streams any number of responses per request: services/ensemble/streaming.py runs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import grpc
from opentelemetry.trace import SpanKind

from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from protos.gen.inference import model_config_pb2 as mc
from services.core import mesh_caller, tracing
from services.core.config import ENSEMBLE_PLATFORM, load_config_file
from services.core.errors import (
    InternalError,
    ModelLoadError,
    QueueTimeout,
    ServingError,
    error_for_status,
)
from services.core.front_calls import CallFailed
from services.core.gateway_client import (
    CHANNEL_OPTIONS,
    WireTensor,
    gateway_address,
    infer_message,
    response_tensors,
    routing_metadata,
)
from services.core.mesh_caller import xds_address
from services.core.repository import CONFIG_FILENAME
from services.core.requests import Array, InferRequest
from services.core.runtime import InstanceSpec, Runtime
from services.ensemble.dataflow import run_dataflow
from services.ensemble.graph import EnsembleGraph, Step, build_graph, is_decoupled
from services.ensemble.streaming import StreamingEnsemble

log = logging.getLogger(__name__)
#: the gateway's routing headers (control_plane/routes.py): model, and version when pinned

#: how long load-time validation waits for the gateway to describe an auto-completed step model
CONFIG_LOOKUP_TIMEOUT_S = 2.0
#: config parameter: how steps travel, ``mesh`` (by the gateway's routes) or ``gateway``
STEP_ROUTING = "step_routing"
STEP_ROUTINGS = ("mesh", "gateway")


class EnsembleRuntime(Runtime):
    backend: ClassVar[str] = ""
    platforms: ClassVar[tuple[str, ...]] = (ENSEMBLE_PLATFORM,)
    #: an ensemble has no model file: its version folder is empty
    default_model_filename: ClassVar[str] = ""
    async_execution: ClassVar[bool] = True
    autocomplete_always: ClassVar[bool] = True

    @classmethod
    def autocomplete(cls, config: mc.ModelConfig, model_path: Path) -> None:
        """Mark the ensemble decoupled exactly when one of its steps is (Triton fills the
        ensemble's ``model_transaction_policy.decoupled`` itself, whatever the file says)."""
        repository = model_path.parent.parent
        lookup = _ConfigLookup(repository, gateway_address(), config.name, ask_gateway=False)
        decoupled = is_decoupled(config, lookup)
        if decoupled != config.model_transaction_policy.decoupled:
            log.info("ensemble %r: decoupled set to %s from its steps", config.name, decoupled)
        config.model_transaction_policy.decoupled = decoupled

    def __init__(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> None:
        self.name = config.name
        self._address = gateway_address()
        repository = model_path.parent.parent
        self.graph: EnsembleGraph = build_graph(
            config, _ConfigLookup(repository, self._address, config.name)
        )
        routing = (
            config.parameters[STEP_ROUTING].string_value
            if STEP_ROUTING in config.parameters
            else "mesh"
        )
        if routing not in STEP_ROUTINGS:
            raise ModelLoadError(
                f"ensemble '{config.name}': parameter {STEP_ROUTING} is {routing!r}; "
                f"use one of {', '.join(STEP_ROUTINGS)}"
            )
        self._via_gateway = routing == "gateway" or not xds_address()
        self._channel: grpc.aio.Channel | None = None
        self._stub: pbg.GRPCInferenceServiceStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: runs the requests of a decoupled ensemble (None: one response per request)
        self._streaming: StreamingEnsemble | None = None
        if self.graph.decoupled:
            self._streaming = StreamingEnsemble(
                self.graph, self._call_step, self._gateway, self._timeout_s
            )
        log.info(
            "ensemble %r: %d steps (%s); steps routed by %s",
            self.name,
            len(self.graph.steps),
            ", ".join(s.model_name for s in self.graph.steps),
            f"the gateway at {self._address}"
            if self._via_gateway
            else f"the gateway's routes from {xds_address()}",
        )

    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        raise InternalError(f"ensemble '{self.name}' runs only on the event loop")

    async def infer_async(self, request: InferRequest, outputs: Sequence[str]) -> dict[str, Array]:
        if self._streaming is not None:
            return await self._streaming.run(request, outputs)
        tensors: dict[str, WireTensor] = {
            name: WireTensor.from_array(self.graph.input_types[name], array)
            for name, array in request.inputs.items()
        }
        await self._run_steps(tensors, request)
        return {
            name: tensors[name].array(f"ensemble '{self.name}' output '{name}'") for name in outputs
        }

    async def _run_steps(self, tensors: dict[str, WireTensor], request: InferRequest) -> None:
        """Run every step, each as soon as what it reads exists; ``tensors`` gains the outputs."""
        waiting = list(self.graph.steps)
        running: dict[asyncio.Task[dict[str, WireTensor]], Step] = {}

        def launch_ready() -> None:
            for step in [s for s in waiting if s.reads <= tensors.keys()]:
                waiting.remove(step)
                task = asyncio.ensure_future(self._call_step(step, tensors, request))
                running[task] = step

        while waiting:
            ready = [s for s in waiting if s.reads <= tensors.keys()]
            if len(ready) != 1:
                break
            # a lone ready step (a chain) runs in this task: no task to create and wait on
            waiting.remove(ready[0])
            tensors.update(await self._call_step(ready[0], tensors, request))
        await run_dataflow(running, tensors, launch_ready)
        if waiting:  # cannot happen for a graph build_graph accepted
            raise InternalError(f"ensemble '{self.name}': steps never became ready: {waiting}")

    async def _call_step(
        self, step: Step, tensors: Mapping[str, WireTensor], request: InferRequest
    ) -> dict[str, WireTensor]:
        message = infer_message(
            step.model_name,
            step.model_version,
            {model_input: tensors[tensor] for model_input, tensor in step.inputs},
            [model_output for model_output, _ in step.outputs],
            request.id,
        )
        timeout = self._timeout_s(request, step)
        attributes = tracing.model_attributes(step.model_name, step.model_version, request.id)
        attributes.update({"meshserve.ensemble": self.name, "meshserve.ensemble.step": step.index})
        with tracing.child_span(
            f"ensemble step {step.index}: {step.model_name}", attributes, SpanKind.CLIENT
        ) as span:
            # routing headers: the gateway routes on them without parsing the body
            metadata = routing_metadata(step.model_name, step.model_version)
            metadata += tracing.inject_metadata()
            try:
                reply = await mesh_caller.for_loop(self._address, "ensemble").model_infer(
                    message, metadata, timeout, via_gateway=self._via_gateway
                )
            except CallFailed as exc:
                error = error_for_status(
                    exc.code, f"ensemble '{self.name}' {step.label} failed: {exc.details}"
                )
                tracing.set_error(span, error.message)
                raise error from None
        try:
            produced = response_tensors(reply, f"ensemble '{self.name}' {step.label}")
        except ServingError as err:
            raise InternalError(err.message) from None
        missing = [o for o, _ in step.outputs if o not in produced]
        if missing:
            raise InternalError(
                f"ensemble '{self.name}' {step.label} answered without outputs {missing}"
            )
        return {tensor: produced[model_output] for model_output, tensor in step.outputs}

    def _timeout_s(self, request: InferRequest, step: Step) -> float | None:
        """Seconds left to the request's deadline as ``step`` starts (None: no deadline)."""
        if not request.deadline_ns:
            return None
        timeout = (request.deadline_ns - time.monotonic_ns()) / 1e9
        if timeout <= 0:
            raise QueueTimeout(
                f"ensemble '{self.name}': the request's deadline passed before {step.label}"
            )
        return timeout

    def _gateway(self) -> pbg.GRPCInferenceServiceStub:
        """The stub on this loop's channel to the gateway (created on first use)."""
        if self._stub is None:
            self._loop = asyncio.get_running_loop()
            self._channel = grpc.aio.insecure_channel(self._address, options=CHANNEL_OPTIONS)
            self._stub = pbg.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    def unload(self) -> None:
        """Close the channel (called from a worker thread once no request is in flight)."""
        channel, loop = self._channel, self._loop
        self._channel = self._stub = None
        if channel is not None and loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(channel.close(None), loop)


class _ConfigLookup:
    """Step model configs for load-time checks: the repository's config.pbtxt, or, for a model
    whose config is auto-completed, what the gateway says it serves (when it can be reached)."""

    def __init__(
        self, repository: Path, gateway: str, ensemble: str, *, ask_gateway: bool = True
    ) -> None:
        self._repository = repository
        self._gateway = gateway
        self._ensemble = ensemble
        self._ask_gateway = ask_gateway
        self._cache: dict[str, mc.ModelConfig | None] = {}

    def __call__(self, name: str) -> mc.ModelConfig | None:
        if name not in self._cache:
            self._cache[name] = self._find(name)
        return self._cache[name]

    def _find(self, name: str) -> mc.ModelConfig | None:
        folder = self._repository / name
        served = None
        config = mc.ModelConfig(name=name)
        path = folder / CONFIG_FILENAME
        if path.is_file():
            try:
                config = load_config_file(path)
            except ServingError as err:
                raise ModelLoadError(
                    f"ensemble '{self._ensemble}': step model '{name}' has a bad config: "
                    f"{err.message}"
                ) from None
        if self._ask_gateway and not (config.input or config.output):
            served = self._served_config(name)
        if served is not None:
            return served
        return config if folder.is_dir() else None

    def _served_config(self, name: str) -> mc.ModelConfig | None:
        try:
            with grpc.insecure_channel(self._gateway) as channel:
                stub = pbg.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
                reply: pb.ModelConfigResponse = stub.ModelConfig(
                    pb.ModelConfigRequest(name=name), timeout=CONFIG_LOOKUP_TIMEOUT_S
                )
        except grpc.RpcError as exc:
            log.info(
                "ensemble %r: no served config for step model %r from the gateway (%s); its "
                "tensors are checked when it runs",
                self._ensemble,
                name,
                exc.code() if isinstance(exc, grpc.Call) else exc,
            )
            return None
        return reply.config
