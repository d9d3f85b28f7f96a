"""gRPC transport: inference.GRPCInferenceService over the data plane.

Each RPC decodes its message, calls the data plane, encodes the answer. Errors are translated in
one place (``translate``, grpc_translate.py): a ServingError becomes its gRPC status and message;
anything else is logged with its traceback and reaches the client as a generic INTERNAL error.

ModelInfer and ModelStreamInfer messages arrive parsed by ``wire.deserialize_infer`` (raw input
tensors stay views over the received message), which server.py registers in place of protobuf's
``FromString`` for those two RPCs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from services.core import stream_forward, tracing
from services.core.codec import decode_infer_request, encode_infer_response
from services.core.dataplane import DataPlane
from services.core.errors import InvalidArgument, ServingError, UnknownModel, Unsupported
from services.core.grpc_translate import (
    SERVICE,
    Ctx,
    metadata_version,
    record_failure,
    routed_version,
    span_attributes,
    translate,
)
from services.core.log_settings import apply_log_settings
from services.core.wire import InferMessage, WireInferRequest, parsed

log = logging.getLogger(__name__)


class InferenceServicer(pbg.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    # ---- health & metadata ------------------------------------------------------------------
    @translate
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Ctx
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._plane.server_live())

    @translate
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Ctx
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.server_ready())

    @translate
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Ctx
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(
            ready=self._plane.model_ready(request.name, request.version or routed_version(context))
        )

    @translate
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Ctx
    ) -> pb.ServerMetadataResponse:
        return self._plane.server_metadata()

    @translate
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Ctx
    ) -> pb.ModelMetadataResponse:
        return self._plane.model_metadata(request.name, request.version or routed_version(context))

    @translate
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Ctx
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(
            config=self._plane.model_config(
                request.name, request.version or routed_version(context)
            )
        )

    @translate
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Ctx
    ) -> pb.ModelStatisticsResponse:
        return self._plane.model_statistics(request.name, request.version)

    # ---- inference -----------------------------------------------------------------------------
    @translate
    async def ModelInfer(self, request: InferMessage, context: Ctx) -> pb.ModelInferResponse:
        arrival = time.monotonic_ns()
        wire = parsed(request)
        req = decode_infer_request(wire.msg, self._plane.shm, raw=wire.raw)
        req.arrival_ns = arrival
        req.trace_context = tracing.current_context()
        remaining = context.time_remaining()
        if remaining is not None:
            req.deadline_ns = arrival + int(remaining * 1e9)
        if not req.model_version:
            req.model_version = routed_version(context)
        return encode_infer_response(await self._plane.infer(req))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[InferMessage], context: Ctx
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream run concurrently (so they can share batches); each response is
        written when ready, with the request's id; an error answers that request only."""
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        metadata = context.invocation_metadata() or ()
        routed = metadata_version(metadata)
        tasks: set[asyncio.Task[None]] = set()
        # requests for models of other services, passed on through the gateway
        forwarder = (
            stream_forward.StreamForwarder(results.put, context.time_remaining)
            if stream_forward.forwarding(metadata)
            else None
        )

        async def one(msg: InferMessage) -> None:
            # one SERVER span per streamed request, each a child of the stream's trace context
            attributes = span_attributes("ModelInfer", msg, metadata)
            attributes["rpc.method"] = "ModelStreamInfer"
            with tracing.server_span(f"{SERVICE}/ModelStreamInfer", metadata, attributes) as span:
                await answer(msg, span)

        async def answer(msg: InferMessage, span: tracing.Span) -> None:
            arrival = time.monotonic_ns()
            try:
                wire = parsed(msg)
                req = decode_infer_request(wire.msg, self._plane.shm, raw=wire.raw)
                req.arrival_ns = arrival
                req.trace_context = tracing.current_context()
                remaining = context.time_remaining()  # the stream's deadline bounds its requests
                if remaining is not None:
                    req.deadline_ns = arrival + int(remaining * 1e9)
                if not req.model_version:
                    req.model_version = routed
                try:
                    async for response in self._plane.infer_stream(req):
                        await results.put(
                            pb.ModelStreamInferResponse(
                                infer_response=encode_infer_response(response)
                            )
                        )
                except UnknownModel:
                    if forwarder is None:
                        raise
                    # another service's model, on a stream the gateway routed here (its order
                    # among this stream's requests is kept: this runs before any await)
                    forwarder.send(wire)
            except Exception as exc:
                record_failure(span, exc)
                if isinstance(exc, ServingError):
                    text = exc.message
                else:
                    log.error("ModelStreamInfer request failed", exc_info=exc)
                    text = "internal error; see the server log"
                # a message that did not parse has no name or id to answer with
                sent = msg.msg if isinstance(msg, WireInferRequest) else pb.ModelInferRequest()
                err = pb.ModelInferResponse(
                    model_name=sent.model_name, model_version=sent.model_version, id=sent.id
                )
                await results.put(
                    pb.ModelStreamInferResponse(error_message=text, infer_response=err)
                )

        async def reader() -> None:
            try:
                async for msg in request_iterator:
                    task = asyncio.create_task(one(msg))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                if forwarder is not None:
                    await forwarder.finish()
            finally:
                await results.put(None)

        read_task = asyncio.create_task(reader())
        try:
            while (item := await results.get()) is not None:
                yield item
        finally:
            read_task.cancel()
            for t in list(tasks):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read_task
            if forwarder is not None:
                await forwarder.cancel()

    # ---- repository -----------------------------------------------------------------------------
    @translate
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Ctx
    ) -> pb.RepositoryIndexResponse:
        return self._plane.repository_index(request.ready)

    @translate
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Ctx
    ) -> pb.RepositoryModelLoadResponse:
        config_json: str | None = None
        files: dict[str, bytes] = {}
        for key, param in request.parameters.items():
            if key == "config":
                config_json = param.string_param
            elif key.startswith("file:"):
                files[key.removeprefix("file:")] = param.bytes_param
            else:
                raise InvalidArgument(
                    f"unknown load parameter '{key}'; expected 'config' or 'file:<path>'"
                )
        await self._plane.load_model(request.model_name, config_json, files)
        return pb.RepositoryModelLoadResponse()

    @translate
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Ctx
    ) -> pb.RepositoryModelUnloadResponse:
        await self._plane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- shared memory ------------------------------------------------------------------------
    @translate
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Ctx
    ) -> pb.SystemSharedMemoryStatusResponse:
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in self._plane.shm.status(request.name or None):
            resp.regions[r.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                )
            )
        return resp

    @translate
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Ctx
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._plane.shm.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @translate
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Ctx
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._plane.shm.unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    @translate
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Ctx
    ) -> pb.CudaSharedMemoryStatusResponse:
        self._plane.cuda_shm.status(request.name or None)
        return pb.CudaSharedMemoryStatusResponse()

    @translate
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Ctx
    ) -> pb.CudaSharedMemoryRegisterResponse:
        self._plane.cuda_shm.register(
            request.name, request.raw_handle, request.device_id, request.byte_size
        )
        return pb.CudaSharedMemoryRegisterResponse()

    @translate
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Ctx
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self._plane.cuda_shm.unregister(request.name or None)
        return pb.CudaSharedMemoryUnregisterResponse()

    # ---- trace & log settings --------------------------------------------------------------------
    @translate
    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: Ctx
    ) -> pb.TraceSettingResponse:
        store = tracing.trace_settings()
        if store is None:
            if request.settings:
                raise Unsupported(tracing.TRACING_OFF)
            current = {"trace_level": ["OFF"]}
        elif request.settings:
            updates = {name: list(v.value) for name, v in request.settings.items()}
            current = store.update(request.model_name, updates)
        else:
            current = store.get(request.model_name)
        resp = pb.TraceSettingResponse()
        for name, values in current.items():
            resp.settings[name].value.extend(values)
        return resp

    @translate
    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: Ctx
    ) -> pb.LogSettingsResponse:
        updates: dict[str, str | int | bool] = {}
        for key, value in request.settings.items():
            kind = value.WhichOneof("parameter_choice")
            if kind is not None:
                updates[key] = getattr(value, kind)
        current = apply_log_settings(self._plane.state.log_settings, updates)
        resp = pb.LogSettingsResponse()
        for key, v in current.items():
            if isinstance(v, bool):
                resp.settings[key].bool_param = v
            elif isinstance(v, int):
                resp.settings[key].uint32_param = v
            else:
                resp.settings[key].string_param = v
        return resp
