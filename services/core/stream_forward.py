"""Requests of one ModelStreamInfer stream for models another service serves.

The gateway routes a gRPC stream once, by its first message, so every later message reaches the
service that serves the first one's model. Triton lets one stream carry requests for any model
(tritonclient's ``async_stream_infer`` names the model per request), so a service that gets a
streamed request for a model it does not have at all passes it on (``StreamForwarder``, one per
client stream): requests for one model and version go, in the order they came, on one
ModelStreamInfer call to the gateway that carries the routing headers (``meshserve-model`` /
``meshserve-version``) and the trace context, so splits, sequences (their order and their
replica) and decoupled models work as on a stream of their own. The responses are written back
on the client's stream under their requests' ids. A model the mesh does not serve anywhere
comes back NOT_FOUND from the gateway, as before.

To know when each forwarded request is done (and which ones an upstream call that fails leaves
unanswered), the forwarded requests ask for the empty final response of a decoupled model
(``triton_enable_empty_final_response``); the client gets that empty response only if it asked
for it too.

Only in a mesh (``MESHSERVE_GATEWAY`` or ``MESHSERVE_XDS`` set, as ``meshserve up`` and the
deploy files do): a service running alone answers NOT_FOUND itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc

from protos.gen.inference import grpc_service_pb2 as pb
from services.core import mesh_caller, tracing
from services.core.dataplane import EMPTY_FINAL_PARAMETER, FINAL_PARAMETER
from services.core.gateway_client import (
    CHANNEL_OPTIONS,
    GATEWAY_ENV,
    gateway_address,
    routing_metadata,
)
from services.core.wire import WireInferRequest

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
#: marks an upstream call: its service never passes requests on again (with routes that still
#: name a service that just unloaded a model, requests would otherwise go round until the
#: routes change)
FORWARDED_HEADER = "meshserve-forwarded"
Write = Callable[[pb.ModelStreamInferResponse], Awaitable[None]]

#: one channel to the gateway per event loop (and gateway address)
_channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, grpc.aio.Channel]] = (
    weakref.WeakKeyDictionary()
)


def forwarding(metadata: Iterable[tuple[str, str | bytes]] = ()) -> bool:
    """Whether this service passes a stream's requests on: it runs in a mesh, and the stream
    (its ``metadata``) is not itself one passed on."""
    if any(key == FORWARDED_HEADER for key, _ in metadata):
        return False
    return bool(os.environ.get(GATEWAY_ENV, "").strip() or mesh_caller.xds_address())


def _channel() -> grpc.aio.Channel:
    loop = asyncio.get_running_loop()
    address = gateway_address()
    found = _channels.get(loop)
    if found is None or found[0] != address:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        found = _channels[loop] = (address, channel)
    return found[1]


@dataclass(slots=True)
class _Pending:
    """A forwarded request not finished yet."""

    id: str
    model: str
    version: str
    #: the client asked for the empty final response of a decoupled model
    wants_empty_final: bool


def _is_final(reply: pb.ModelInferResponse) -> bool:
    """Whether a response is its request's last: a model that is not decoupled sends one, with
    no FINAL parameter; a decoupled one marks its last."""
    if FINAL_PARAMETER not in reply.parameters:
        return True
    return reply.parameters[FINAL_PARAMETER].bool_param


class _Upstream:
    """One ModelStreamInfer call to the gateway for the requests of one model and version."""

    def __init__(self, model: str, version: str, write: Write, timeout_s: float | None) -> None:
        self._requests: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()
        self._pending: list[_Pending] = []
        self._write = write
        metadata = routing_metadata(model, version) + tracing.inject_metadata()
        metadata.append((FORWARDED_HEADER, "1"))
        self._call = _channel().stream_stream(
            STREAM_METHOD,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )(self._outgoing(), metadata=tuple(metadata), timeout=timeout_s)
        self.task = asyncio.ensure_future(self._relay())

    def send(self, wire: WireInferRequest) -> None:
        request = pb.ModelInferRequest()
        request.CopyFrom(wire.msg)
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(bytes(raw) for raw in wire.raw)
        wants = request.parameters[EMPTY_FINAL_PARAMETER].bool_param
        request.parameters[EMPTY_FINAL_PARAMETER].bool_param = True
        self._pending.append(_Pending(request.id, request.model_name, request.model_version, wants))
        self._requests.put_nowait(request)

    def close(self) -> None:
        """No more requests: the call ends once the last one is answered."""
        self._requests.put_nowait(None)

    async def _outgoing(self) -> AsyncIterator[pb.ModelInferRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def _settle(self, response: pb.ModelStreamInferResponse) -> bool:
        """Whether the client gets ``response``; its request leaves the pending list when it
        is the last."""
        reply = response.infer_response
        found = next((p for p in self._pending if p.id == reply.id), None)
        last = bool(response.error_message) or _is_final(reply)
        if found is not None and last:
            self._pending.remove(found)
        empty_final = last and not reply.outputs and not response.error_message
        wanted = found.wants_empty_final if found is not None else False
        return not (empty_final and FINAL_PARAMETER in reply.parameters and not wanted)

    async def _relay(self) -> None:
        try:
            async for response in self._call:
                if self._settle(response):
                    await self._write(response)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or exc.code().name
            for pending in self._pending:  # the call ended: each unanswered request fails
                await self._write(
                    pb.ModelStreamInferResponse(
                        error_message=details,
                        infer_response=pb.ModelInferResponse(
                            model_name=pending.model, model_version=pending.version, id=pending.id
                        ),
                    )
                )
            self._pending.clear()
        finally:
            self._call.cancel()


class StreamForwarder:
    """The upstream calls of one client stream, by (model, version) as the requests name them."""

    def __init__(self, write: Write, timeout_s: Callable[[], float | None]) -> None:
        self._write = write
        self._timeout_s = timeout_s
        self._upstreams: dict[tuple[str, str], _Upstream] = {}

    def send(self, wire: WireInferRequest) -> None:
        """Pass ``wire`` on, after the requests sent before it for the same model and version
        (call in the order the client's messages came)."""
        key = (wire.msg.model_name, wire.msg.model_version)
        upstream = self._upstreams.get(key)
        if upstream is None:
            upstream = self._upstreams[key] = _Upstream(*key, self._write, self._timeout_s())
        upstream.send(wire)

    async def finish(self) -> None:
        """The client sent its last request: wait for every forwarded one's responses."""
        for upstream in self._upstreams.values():
            upstream.close()
        await asyncio.gather(*(u.task for u in self._upstreams.values()), return_exceptions=True)

    async def cancel(self) -> None:
        """The client's stream ended early: cancel every upstream call."""
        tasks = [u.task for u in self._upstreams.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
