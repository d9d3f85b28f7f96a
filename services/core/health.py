"""gRPC health checking (grpc.health.v1): the one readiness signal for Envoy, Consul, supervisors.

The overall service ("") and ``inference.GRPCInferenceService`` are SERVING once the initial
models are loaded; from the moment shutdown begins they are NOT_SERVING for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from protos.gen.health import health_pb2 as hpb
from protos.gen.health import health_pb2_grpc as hgrpc
from services.core.errors import status_details

INFERENCE_SERVICE = "inference.GRPCInferenceService"


class HealthServicer(hgrpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, hpb.HealthCheckResponse.ServingStatus] = {
            "": hpb.HealthCheckResponse.NOT_SERVING,
            INFERENCE_SERVICE: hpb.HealthCheckResponse.NOT_SERVING,
        }
        self._changed: asyncio.Condition | None = None
        self._shutdown = False

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def set_serving(self, serving: bool) -> None:
        if self._shutdown:
            return
        value = hpb.HealthCheckResponse.SERVING if serving else hpb.HealthCheckResponse.NOT_SERVING
        async with self._condition():
            for name in self._status:
                self._status[name] = value
            self._condition().notify_all()

    async def enter_shutdown(self) -> None:
        await self.set_serving(False)
        self._shutdown = True

    async def Check(
        self, request: hpb.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> hpb.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, status_details(f"unknown service '{request.service}'")
            )
        return hpb.HealthCheckResponse(status=status)

    async def Watch(
        self, request: hpb.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[hpb.HealthCheckResponse]:
        last: int | None = None
        cond = self._condition()
        while True:
            status = self._status.get(request.service, hpb.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                last = status
                yield hpb.HealthCheckResponse(status=status)
            async with cond:
                await cond.wait()
