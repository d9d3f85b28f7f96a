"""The control plane's front over gRPC: inference.GRPCInferenceService for the whole mesh.

Where it sits: Envoy sends here the server-level RPCs, model control and shared memory, and the
model-scoped requests it could not route (unknown model, or a compressed message its body-field
extraction cannot read; grpc has decompressed it by the time it reaches a method here). Each
method is a thin adapter over ``front_core.Front`` (decisions are documented there); a
model-scoped request for a known model is proxied to a service that has it, with the caller's
metadata and remaining deadline. Errors are translated in one place (``_translate``): a
FrontError becomes its status and message; anything else is logged and answered INTERNAL.

The traffic-policy API is not part of this service.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial, wraps
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from control_plane.front_core import Front, serialize
from control_plane.front_errors import FrontError
from control_plane.model import ServiceInstance
from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from services.core.errors import status_details

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
M = TypeVar("M", bound=Message)
Ctx = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Ctx], Awaitable[Resp]]
Metadata = tuple[tuple[str, str | bytes], ...]

#: request metadata that belongs to one hop and is not forwarded to a service
_HOP_METADATA = frozenset({"content-type", "te", "user-agent", "host", "accept-encoding"})


async def _abort(context: Ctx, exc: BaseException, method: str) -> NoReturn:
    if isinstance(exc, FrontError):
        await context.abort(exc.code, status_details(exc.message))
    log.error("front %s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def _translate(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    @wraps(fn)
    async def wrapper(self: Any, request: Req, context: Ctx) -> Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc, fn.__name__)

    return wrapper


def forwarded_metadata(context: Ctx) -> Metadata:
    """The caller's metadata minus per-hop and gRPC-reserved keys (trace context, version
    headers and the like travel on)."""
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if key not in _HOP_METADATA and not key.startswith((":", "grpc-"))
    )


def add_front_to_server(front: Front, server: grpc.aio.Server) -> FrontServicer:
    """Serve inference.GRPCInferenceService for the mesh on ``server`` (not yet started)."""
    servicer = FrontServicer(front)
    pbg.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    return servicer


class FrontServicer(pbg.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService answered for the mesh by ``front``."""

    def __init__(self, front: Front) -> None:
        self._front = front

    async def _proxy(
        self,
        context: Ctx,
        method: str,
        request: Message,
        response_type: type[M],
        name: str,
        version: str,
    ) -> M:
        inst = self._front.route(name, version)
        return await self._front.call(
            inst,
            method,
            request,
            response_type,
            rpc_timeout=context.time_remaining(),
            metadata=forwarded_metadata(context),
        )

    def _fan_out_timeout(self, context: Ctx) -> float:
        remaining = context.time_remaining()
        limit = self._front.fanout_timeout
        return limit if remaining is None else min(limit, remaining)

    # ---- health & metadata ------------------------------------------------------------------
    @_translate
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Ctx
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._front.live())

    @_translate
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Ctx
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._front.ready())

    @_translate
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Ctx
    ) -> pb.ServerMetadataResponse:
        return await self._front.metadata()

    # ---- model-scoped: reach the front only when Envoy could not route them --------------------
    @_translate
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Ctx
    ) -> pb.ModelReadyResponse:
        if not self._front.instances_of(request.name, request.version):
            return pb.ModelReadyResponse(ready=False)  # as Triton: unknown is not ready
        try:
            return await self._proxy(
                context,
                "ModelReady",
                request,
                pb.ModelReadyResponse,
                request.name,
                request.version,
            )
        except FrontError as exc:
            log.info("ModelReady %r: %s", request.name, exc.message)
            return pb.ModelReadyResponse(ready=False)

    @_translate
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Ctx
    ) -> pb.ModelMetadataResponse:
        return await self._proxy(
            context,
            "ModelMetadata",
            request,
            pb.ModelMetadataResponse,
            request.name,
            request.version,
        )

    @_translate
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Ctx
    ) -> pb.ModelConfigResponse:
        return await self._proxy(
            context, "ModelConfig", request, pb.ModelConfigResponse, request.name, request.version
        )

    @_translate
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Ctx
    ) -> pb.ModelStatisticsResponse:
        return await self._front.statistics(
            request.name, request.version, self._fan_out_timeout(context)
        )

    @_translate
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Ctx
    ) -> pb.ModelInferResponse:
        return await self._proxy(
            context,
            "ModelInfer",
            request,
            pb.ModelInferResponse,
            request.model_name,
            request.model_version,
        )

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Ctx
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """The stream is pinned by its first message that names a model some instance serves:
        it and every later message go to that instance (which passes on requests for other
        services' models), whose responses come back as they are written. A message before it
        that names no such model is answered with its error on the stream, which goes on (as
        in Triton)."""
        messages = aiter(request_iterator)
        while True:
            try:
                first = await anext(messages)
            except StopAsyncIteration:
                return
            try:
                inst = self._front.route(first.model_name, first.model_version)
                break
            except FrontError as exc:
                yield pb.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=pb.ModelInferResponse(
                        model_name=first.model_name,
                        model_version=first.model_version,
                        id=first.id,
                    ),
                )

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            yield first
            async for message in messages:
                yield message

        stub = self._front.channel(inst).stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=serialize,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        call = stub(
            requests(), timeout=context.time_remaining(), metadata=forwarded_metadata(context)
        )
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            await _abort(context, FrontError.from_rpc(exc, inst), "ModelStreamInfer")
        finally:
            call.cancel()

    # ---- repository ---------------------------------------------------------------------------
    @_translate
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Ctx
    ) -> pb.RepositoryIndexResponse:
        return await self._front.repository_index(request.ready)

    @_translate
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Ctx
    ) -> pb.RepositoryModelLoadResponse:
        await self._front.control(
            "RepositoryModelLoad",
            request,
            pb.RepositoryModelLoadResponse,
            request.model_name,
            context.time_remaining(),
        )
        return pb.RepositoryModelLoadResponse()

    @_translate
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Ctx
    ) -> pb.RepositoryModelUnloadResponse:
        await self._front.control(
            "RepositoryModelUnload",
            request,
            pb.RepositoryModelUnloadResponse,
            request.model_name,
            context.time_remaining(),
        )
        return pb.RepositoryModelUnloadResponse()

    # ---- made on every co-located service ------------------------------------------------------
    async def _everywhere(
        self, context: Ctx, method: str, request: Message, response_type: type[M]
    ) -> M:
        return await self._front.everywhere(
            method, request, response_type, self._fan_out_timeout(context)
        )

    @_translate
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Ctx
    ) -> pb.SystemSharedMemoryStatusResponse:
        return await self._everywhere(
            context, "SystemSharedMemoryStatus", request, pb.SystemSharedMemoryStatusResponse
        )

    @_translate
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Ctx
    ) -> pb.SystemSharedMemoryRegisterResponse:
        instances = self._front.state().instances
        answer = await self._front.everywhere(
            "SystemSharedMemoryRegister",
            request,
            pb.SystemSharedMemoryRegisterResponse,
            self._fan_out_timeout(context),
            instances,
        )
        self._front.regions.registered(request, instances)
        return answer

    @_translate
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Ctx
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        try:
            return await self._everywhere(
                context,
                "SystemSharedMemoryUnregister",
                request,
                pb.SystemSharedMemoryUnregisterResponse,
            )
        finally:
            self._front.regions.unregistered(request.name)

    @_translate
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Ctx
    ) -> pb.CudaSharedMemoryStatusResponse:
        return await self._everywhere(
            context, "CudaSharedMemoryStatus", request, pb.CudaSharedMemoryStatusResponse
        )

    @_translate
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Ctx
    ) -> pb.CudaSharedMemoryRegisterResponse:
        return await self._everywhere(
            context, "CudaSharedMemoryRegister", request, pb.CudaSharedMemoryRegisterResponse
        )

    @_translate
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Ctx
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return await self._everywhere(
            context, "CudaSharedMemoryUnregister", request, pb.CudaSharedMemoryUnregisterResponse
        )

    # ---- trace & log settings: made on every service, answered with the first one's --------------
    async def _update_settings(
        self,
        context: Ctx,
        method: str,
        request: Message,
        response_type: type[M],
        book: Callable[[Sequence[ServiceInstance]], None],
    ) -> M:
        """A settings update: made on every service and, once all accepted it, ``book``ed for
        those that join later (under the book's lock: no replay to a joining service overtakes
        it)."""
        async with self._front.shared_settings.lock:
            instances = self._front.state().instances
            answer = await self._front.everywhere(
                method, request, response_type, self._fan_out_timeout(context), instances
            )
            book(instances)
        return answer

    @_translate
    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: Ctx
    ) -> pb.TraceSettingResponse:
        if not request.settings:
            return await self._everywhere(context, "TraceSetting", request, pb.TraceSettingResponse)
        response = await self._update_settings(
            context,
            "TraceSetting",
            request,
            pb.TraceSettingResponse,
            partial(self._front.shared_settings.trace_updated, request),
        )
        if not request.model_name:
            self._front.global_trace_settings_changed(
                {k: list(v.value) for k, v in response.settings.items()}
            )
        return response

    @_translate
    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: Ctx
    ) -> pb.LogSettingsResponse:
        if not request.settings:
            return await self._everywhere(context, "LogSettings", request, pb.LogSettingsResponse)
        return await self._update_settings(
            context,
            "LogSettings",
            request,
            pb.LogSettingsResponse,
            partial(self._front.shared_settings.log_updated, request),
        )
