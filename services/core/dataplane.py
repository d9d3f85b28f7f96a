"""The transport-agnostic data plane: what every RPC means, whichever transport carried it.

The gRPC servicer and the HTTP app are thin adapters over this class: they decode their wire
format, call one method here, and encode the result. Server-level answers (metadata, index,
statistics) are returned as the protocol's messages so both transports render the same facts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes
from services.core.classification import classify, load_labels
from services.core.decoupled import ResponseStream, StreamItem
from services.core.errors import InvalidArgument, ServingError, Unavailable
from services.core.manager import ModelManager
from services.core.model import ServedModel
from services.core.requests import (
    Array,
    InferRequest,
    InferResponse,
    OutputTensor,
    RequestedOutput,
    SharedMemoryRef,
)
from services.core.shm import CudaSharedMemory, SystemSharedMemory
from services.core.tracing import trace_settings

log = logging.getLogger(__name__)

#: response parameter marking a stream's last response to a request (Triton's name)
FINAL_PARAMETER = "triton_final_response"
#: request parameter asking for an empty response when a decoupled model ends without outputs
EMPTY_FINAL_PARAMETER = "triton_enable_empty_final_response"


async def _next_response(stream: ResponseStream, execution: asyncio.Future[Any]) -> StreamItem:
    """The model's next response; raises what execute raised if it fails before sending more."""
    while True:
        getter = asyncio.ensure_future(stream.get())
        waiting: set[asyncio.Future[Any]] = {getter}
        if not execution.done():
            waiting.add(execution)
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            getter.cancel()
            raise
        if getter in done:
            return getter.result()
        getter.cancel()
        execution.result()  # execute failed: its error fails the request


SERVER_VERSION = "0.1.0"
#: the protocol extensions this server really implements (perf_analyzer looks for "statistics")
EXTENSIONS = (
    "classification",
    "sequence",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "system_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "logging",
)


@dataclass(slots=True)
class ServerState:
    """Liveness and readiness of the process (readiness drops for good once shutdown starts)."""

    live: bool = True
    ready: bool = False
    #: inference requests that reached this process (a leaving service waits for it to stand still)
    arrivals: int = 0
    log_settings: dict[str, str | int | bool] = field(default_factory=dict)


class DataPlane:
    def __init__(
        self,
        manager: ModelManager,
        server_name: str = "meshserve",
        *,
        strict_readiness: bool = False,
    ) -> None:
        self.manager = manager
        self.server_name = server_name
        #: --strict-readiness: ServerReady also needs every model ready (Triton's rule)
        self.strict_readiness = strict_readiness
        self.state = ServerState()
        self.shm = SystemSharedMemory()
        self.cuda_shm = CudaSharedMemory()
        self._labels: dict[tuple[int, str], list[str] | None] = {}

    # ---- health & metadata ---------------------------------------------------------------------
    def server_live(self) -> bool:
        return self.state.live

    def server_ready(self) -> bool:
        """Started and not stopping; with --strict-readiness also every model the service
        tracks ready (one unloaded on request does not count against it)."""
        return self.state.ready and (not self.strict_readiness or self.manager.all_ready())

    def serving(self) -> bool:
        """The mesh's readiness signal (gRPC health, and ``/meshserve/v1/serving`` for the
        gateway's REST health checks): started and not stopping, whatever the models' states."""
        return self.state.ready

    def server_metadata(self) -> pb.ServerMetadataResponse:
        # "trace" (TraceSetting can change sampling) only when tracing was set up
        extensions = EXTENSIONS if trace_settings() is None else (*EXTENSIONS, "trace")
        return pb.ServerMetadataResponse(
            name=self.server_name, version=SERVER_VERSION, extensions=extensions
        )

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.manager.get(name, version)
        except ServingError:
            return False
        return self.state.ready or self.state.live

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        model = self.manager.get(name, version)
        config = model.config
        batch = [-1] if config.max_batch_size > 0 else []
        versions = [m.version_str for m in self.manager.ready_models() if m.name == name]
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=sorted(versions, key=int),
            platform=config.platform or config.backend,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=i.name,
                    datatype=dtypes.triton_from_config(i.data_type),
                    shape=[*batch, *i.dims],
                )
                for i in config.input
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=o.name,
                    datatype=dtypes.triton_from_config(o.data_type),
                    shape=[*batch, *o.dims],
                )
                for o in config.output
            ],
        )

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        return self.manager.get(name, version).config

    def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        if name and version:
            models = [self.manager.get(name, version)]
        else:
            models = [m for m in self.manager.ready_models() if not name or m.name == name]
            if name and not models:
                self.manager.get(name, "")  # raises NotFound / Unavailable with the reason
        models.sort(key=lambda m: (m.name, m.version))
        return pb.ModelStatisticsResponse(
            model_stats=[m.stats.to_proto(m.name, m.version_str) for m in models]
        )

    def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in self.manager.index(ready_only)
            ]
        )

    # ---- inference ------------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        self.state.arrivals += 1
        if not self.state.live:
            raise Unavailable("server is shutting down")
        model = self.manager.get(request.model_name, request.model_version)
        if model.decoupled:
            raise InvalidArgument(
                f"model '{model.name}' is decoupled (it may send any number of responses): call "
                "it with ModelStreamInfer (tritonclient: start_stream + async_stream_infer)"
            )
        result = await model.infer(request)
        outputs = self._outputs(model, request.outputs, result.outputs)
        return InferResponse(model.name, model.version_str, request.id, outputs)

    async def infer_stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """The responses to one request of a stream: exactly one, or for a decoupled model each
        one it sends, every one with ``triton_final_response`` (true on the last). A FINAL flag
        sent without outputs becomes an empty response only when the request asked for it
        (``triton_enable_empty_final_response``, as tritonclient sets it)."""
        self.state.arrivals += 1
        if not self.state.live:
            raise Unavailable("server is shutting down")
        model = self.manager.get(request.model_name, request.model_version)
        if not model.decoupled:
            yield await self.infer(request)
            return
        stream = request.response_stream = ResponseStream()
        want_empty_final = bool(request.parameters.get(EMPTY_FINAL_PARAMETER, False))
        execution = asyncio.ensure_future(model.infer(request))
        first = True
        try:
            while True:
                item = await _next_response(stream, execution)
                if item.error is not None:
                    raise item.error
                if item.outputs is not None:
                    outputs = self._outputs(model, request.outputs, item.outputs)
                elif item.final and want_empty_final:
                    outputs = []
                elif item.final:  # the last response carried no outputs: nothing to send
                    break
                else:
                    continue
                if first and request.arrival_ns and (latency := model.stats.latency):
                    latency.on_first_response(time.monotonic_ns() - request.arrival_ns)
                first = False
                yield InferResponse(
                    model.name,
                    model.version_str,
                    request.id,
                    outputs,
                    {FINAL_PARAMETER: item.final},
                )
                if item.final:
                    break
            await execution  # execute has returned by now, or returns soon
        finally:
            if not stream.final_sent:
                stream.cancel()
            if not execution.done():
                execution.cancel()

    def _outputs(
        self, model: ServedModel, requested: list[RequestedOutput], values: dict[str, Array]
    ) -> list[OutputTensor]:
        if not requested:
            return [
                OutputTensor(n, model.output_datatype(n), values[n]) for n in model.output_names
            ]
        out: list[OutputTensor] = []
        for spec in requested:
            data = values[spec.name]
            datatype = model.output_datatype(spec.name)
            if spec.classification > 0:
                labels = self._labels_for(model, spec.name)
                data = classify(data, spec.classification, labels, model.config.max_batch_size > 0)
                datatype = "BYTES"
            tensor = OutputTensor(spec.name, datatype, data, binary_data=spec.binary_data)
            if spec.shared_memory is not None:
                ref = spec.shared_memory
                payload = (
                    dtypes.serialize_bytes(data)
                    if data.dtype == np.object_
                    else np.ascontiguousarray(data)
                )
                size = len(payload) if isinstance(payload, bytes) else payload.nbytes
                if size > ref.byte_size:
                    raise InvalidArgument(
                        f"output '{spec.name}' needs {size} bytes but only {ref.byte_size} "
                        f"were given in shared memory region '{ref.region}'"
                    )
                self.shm.write(ref.region, ref.offset, payload, tensor=spec.name)
                ref = SharedMemoryRef(ref.region, size, ref.offset)
                tensor.shared_memory = ref
            out.append(tensor)
        return out

    def _labels_for(self, model: ServedModel, output: str) -> list[str] | None:
        key = (id(model), output)
        if key not in self._labels:
            spec = next((o for o in model.config.output if o.name == output), None)
            labels = None
            if spec is not None and spec.label_filename:
                labels = load_labels(model.version_path.parent / spec.label_filename)
            self._labels[key] = labels
        return self._labels[key]

    # ---- model control ---------------------------------------------------------------------
    async def load_model(self, name: str, config_json: str | None, files: dict[str, bytes]) -> None:
        from services.core.config import parse_config_json

        override = (
            parse_config_json(config_json, f"load request for '{name}'") if config_json else None
        )
        if files and override is None:
            raise InvalidArgument(
                f"load request for '{name}' carries files but no 'config' parameter; "
                "both are needed"
            )
        await self.manager.load(name, override, files or None)

    async def unload_model(self, name: str) -> None:
        await self.manager.unload(name)
