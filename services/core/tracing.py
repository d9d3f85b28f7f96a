"""OpenTelemetry tracing for the serving kit, through the OpenTelemetry API only.

Data flow: a transport (grpc_servicer, http_app) opens ``server_span`` around each RPC, as child of
the W3C trace context its caller sent (``traceparent`` / ``tracestate`` in gRPC metadata or HTTP
headers), and keeps it the current span while the handler runs; code called inside sees it through
``opentelemetry.context``: ``ServedModel`` records the request's queue wait and batch execution as
child spans with ``record_span`` once its batch returned, and outgoing calls (BLS, ensemble steps)
carry the context with ``inject_metadata``. Work on another thread gets the request's context
explicitly (``InferRequest.trace_context``, then ``attached``).

Until ``configure_tracing`` installs the SDK (a service's entry point does, and only when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set) every call here
is the API's no-op: spans are not recorded, yet a caller's ``traceparent`` still travels on.
The SDK side (exporter, sampler, flush on shutdown) lives in ``tracing_sdk``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from services.core.trace_config import TraceFlags
    from services.core.trace_settings import TraceSettingsStore
    from services.core.tracing_sdk import TraceControl

#: span attribute names shared by every service (the sampler reads MODEL_NAME)
MODEL_NAME = "model.name"
MODEL_VERSION = "model.version"
REQUEST_ID = "request.id"
BATCH_SIZE = "batch.size"
#: set (True) on a request answered from the response cache
CACHE_HIT = "cache.hit"

Attributes = dict[str, AttributeValue]
Span = trace.Span

#: what an update of the trace settings answers when this process exports no spans
TRACING_OFF = (
    "tracing is off in this service: it exports spans only when OTEL_EXPORTER_OTLP_ENDPOINT "
    "(or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set when it starts"
)

_tracer = trace.get_tracer("meshserve")
_control: TraceControl | None = None


# ---- set-up (entry points only) ---------------------------------------------------------------
def configure_tracing(
    service_name_default: str,
    env: Mapping[str, str] | None = None,
    flags: TraceFlags | None = None,
) -> TraceControl | None:
    """Install the OpenTelemetry SDK for this process when a collector is configured.

    Triton's tracing ``flags`` (``--trace-config mode=opentelemetry``: OTLP/HTTP) come first;
    otherwise ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` names an OTLP/gRPC collector. Also read
    from ``env`` (default ``os.environ``): ``OTEL_SERVICE_NAME`` (default:
    ``service_name_default``, e.g. "meshserve-onnx") and ``OTEL_TRACES_SAMPLER(_ARG)``. Returns
    None, installing nothing, when no collector is named. Call once per process, from its entry
    point; ``TraceControl.shutdown`` flushes at exit.
    """
    from services.core.tracing_sdk import install

    global _control
    control = install(service_name_default, env, flags)
    if control is not None:
        _control = control
    return control


def deactivate(control: TraceControl) -> None:
    """Forget ``control`` (its shutdown calls this): TraceSetting reports tracing as off again."""
    global _control
    if _control is control:
        _control = None


def trace_settings() -> TraceSettingsStore | None:
    """The process's trace settings (TraceSetting reads and changes them); None: tracing off."""
    return _control.settings if _control is not None else None


# ---- context propagation ---------------------------------------------------------------------
def extract_context(
    carrier: Iterable[tuple[str, str | bytes]] | Mapping[str, str],
) -> otel_context.Context:
    """The trace context a caller sent: gRPC invocation metadata (pairs) or HTTP headers."""
    if not isinstance(carrier, Mapping):
        carrier = {key: value for key, value in carrier if isinstance(value, str)}
    return propagate.extract(carrier)


def inject_metadata() -> list[tuple[str, str]]:
    """Metadata carrying the current trace context, for an outgoing gRPC call (or HTTP headers)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def current_context() -> otel_context.Context:
    """The active context, to hand to work that runs on another thread (see ``attached``)."""
    return otel_context.get_current()


@contextlib.contextmanager
def attached(ctx: object | None) -> Iterator[None]:
    """Make ``ctx`` (a context from ``current_context``) the active one in this thread for the
    block; nothing happens for None. Worker threads do not inherit the caller's context."""
    if not isinstance(ctx, otel_context.Context):
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


# ---- spans -----------------------------------------------------------------------------------
def model_attributes(model: str, version: str = "", request_id: str = "") -> Attributes:
    attributes: Attributes = {MODEL_NAME: model}
    if version:
        attributes[MODEL_VERSION] = version
    if request_id:
        attributes[REQUEST_ID] = request_id
    return attributes


@contextlib.contextmanager
def server_span(
    name: str,
    carrier: Iterable[tuple[str, str | bytes]] | Mapping[str, str],
    attributes: Attributes,
) -> Iterator[trace.Span]:
    """A SERVER span for one incoming request, child of the caller's trace context and the current
    span while the block runs. The block sets an error status itself (``set_error``); a
    cancellation is recorded as one."""
    parent = extract_context(carrier)
    span = _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except BaseException as exc:
        if not isinstance(exc, Exception):  # cancelled: the caller went away, or shutdown
            set_error(span, f"{type(exc).__name__}: the request was cancelled")
        raise
    finally:
        otel_context.detach(token)
        span.end()


@contextlib.contextmanager
def child_span(
    name: str, attributes: Attributes | None = None, kind: SpanKind = SpanKind.INTERNAL
) -> Iterator[trace.Span]:
    """A span under the current one, current while the block runs (e.g. one ensemble step, or a
    CLIENT span around an outgoing call: inject_metadata inside the block then names it)."""
    with _tracer.start_as_current_span(
        name, kind=kind, attributes=attributes, record_exception=True
    ) as span:
        yield span


def set_error(span: trace.Span, description: str, exc: BaseException | None = None) -> None:
    """Mark ``span`` failed (with the exception's event when given)."""
    if span.is_recording():
        if exc is not None:
            span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, description))


def annotate(attributes: Attributes) -> None:
    """Add attributes to the current span (when it is sampled)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)


def recording() -> bool:
    """Whether the current span is sampled (worth adding child spans or attributes to)."""
    return trace.get_current_span().is_recording()


def epoch_ns(monotonic_ns: int) -> int:
    """A ``time.monotonic_ns()`` reading as the wall-clock nanoseconds spans are stamped with."""
    return monotonic_ns + (time.time_ns() - time.monotonic_ns())


def record_span(
    name: str, start_monotonic_ns: int, end_monotonic_ns: int, attributes: Attributes
) -> None:
    """A finished child span of the current one, with explicit times (``time.monotonic_ns``), for
    work that ran elsewhere (another task or thread) and is known only once it is over."""
    offset = time.time_ns() - time.monotonic_ns()
    span = _tracer.start_span(name, start_time=start_monotonic_ns + offset, attributes=attributes)
    span.end(end_time=max(end_monotonic_ns, start_monotonic_ns) + offset)
