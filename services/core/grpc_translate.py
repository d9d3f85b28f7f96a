"""What wraps every RPC of the gRPC servicer: error translation, its SERVER span, routed version.

Data flow: a gRPC call ─▶ ``translate`` (a SERVER span around it, health probes left out) ─▶ the
InferenceServicer method (grpc_servicer.py) ─▶ the data plane. An error the method raises comes
back through ``abort``: a ServingError becomes its gRPC status and message; anything else is
logged with its traceback and reaches the client as a generic INTERNAL error. ``routed_version``
reads the model version the gateway chose for the call from its ``meshserve-version`` header.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import grpc

from services.core import tracing
from services.core.errors import InvalidArgument, ServingError, status_details
from services.core.wire import WireInferRequest

log = logging.getLogger(__name__)

#: set by the gateway: the model version its route (or traffic split) chose for this call
VERSION_HEADER = "meshserve-version"
SERVICE = "inference.GRPCInferenceService"
#: never traced: health probes, polled all the time (grpc.health.v1 is another servicer), and
#: TraceSetting, so that reading the settings takes no trace from trace_count (Triton traces
#: inference requests only)
UNTRACED = frozenset({"ServerLive", "ServerReady", "ModelReady", "TraceSetting"})
#: RPC → its request's (model name, model version) fields, for span attributes and sampling
_MODEL_FIELDS: dict[str, tuple[str, str]] = {
    "ModelInfer": ("model_name", "model_version"),
    "ModelMetadata": ("name", "version"),
    "ModelConfig": ("name", "version"),
    "ModelStatistics": ("name", "version"),
    "RepositoryModelLoad": ("model_name", ""),
    "RepositoryModelUnload": ("model_name", ""),
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Ctx], Awaitable[Resp]]
Metadata = Iterable[tuple[str, str | bytes]]


async def abort(context: Ctx, exc: BaseException, method: str) -> NoReturn:
    if isinstance(exc, ServingError):
        await context.abort(exc.grpc_status, status_details(exc.message))
    log.error("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def translate(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Errors → status (``abort``); every RPC but ``UNTRACED`` runs in a SERVER span."""
    method = fn.__name__
    if method in UNTRACED:

        @wraps(fn)
        async def untraced(self: Any, request: Req, context: Ctx) -> Resp:
            try:
                return await fn(self, request, context)
            except (ServingError, Exception) as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await abort(context, exc, method)

        return untraced

    @wraps(fn)
    async def wrapper(self: Any, request: Req, context: Ctx) -> Resp:
        metadata = context.invocation_metadata() or ()
        attributes = span_attributes(method, request, metadata)
        with tracing.server_span(f"{SERVICE}/{method}", metadata, attributes) as span:
            try:
                return await fn(self, request, context)
            except (ServingError, Exception) as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                record_failure(span, exc)
                await abort(context, exc, method)

    return wrapper


def record_failure(span: tracing.Span, exc: BaseException) -> None:
    if isinstance(exc, ServingError):
        span.set_attribute("rpc.grpc.status_code", exc.grpc_status.value[0])
        tracing.set_error(span, exc.message)
    else:
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.INTERNAL.value[0])
        tracing.set_error(span, f"internal error: {type(exc).__name__}", exc)


def span_attributes(method: str, request: Any, metadata: Metadata) -> tracing.Attributes:
    attributes: tracing.Attributes = {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": method,
    }
    if isinstance(request, WireInferRequest):
        request = request.msg
    elif isinstance(request, InvalidArgument):  # a ModelInfer message that did not parse
        return attributes
    fields = _MODEL_FIELDS.get(method)
    if fields is not None and getattr(request, fields[0]):
        name_field, version_field = fields
        version = getattr(request, version_field) if version_field else ""
        if version_field and not version:
            version = metadata_version(metadata)
        request_id = request.id if method == "ModelInfer" else ""
        attributes.update(
            tracing.model_attributes(getattr(request, name_field), version, request_id)
        )
    return attributes


def routed_version(context: Ctx) -> str:
    """The version the gateway chose, from the ``meshserve-version`` header ("" when absent)."""
    return metadata_version(context.invocation_metadata() or ())


def metadata_version(metadata: Metadata) -> str:
    for key, value in metadata:
        if key == VERSION_HEADER:
            return value if isinstance(value, str) else value.decode()
    return ""
