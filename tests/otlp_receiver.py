"""Real OTLP trace receivers for tests, on port 0: ``OtlpReceiver`` serves OTLP/gRPC
(``opentelemetry.proto``'s TraceService), ``OtlpHttpReceiver`` OTLP/HTTP (protobuf bodies POSTed
to ``/v1/traces``, as Triton's ``--trace-config opentelemetry,url=`` sends them).

Services (in-process or subprocesses) and Envoy export to ``endpoint``; every span received is
kept as a ``ReceivedSpan`` (ids as hex, the exporting service's name and resource, attributes as
plain values), and ``wait_for`` polls them with a deadline instead of sleeping. Given
``tls`` (``tests.tls_certs``), a receiver serves TLS with the server certificate (``https://``),
and with ``client_auth`` asks for a client certificate signed by the same CA; the headers (or gRPC
metadata) of every export are kept in ``headers``.
"""

from __future__ import annotations

import gzip
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.tls_certs import TlsFiles

SPAN_KIND_SERVER = trace_pb2.Span.SPAN_KIND_SERVER
SPAN_KIND_CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
STATUS_ERROR = trace_pb2.Status.STATUS_CODE_ERROR


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    #: the exporting resource's attributes
    resource: dict[str, Any] = field(default_factory=dict)


def received_spans(request: ts_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """The spans of one export request, with their resource's service name."""
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=service,
                        name=s.name,
                        kind=s.kind,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        status_code=s.status.code,
                        status_message=s.status.message,
                        resource=resource,
                    )
                )
    return spans


class _TraceService(ts_grpc.TraceServiceServicer):
    def __init__(self, sink: _SpanSink) -> None:
        self._sink = sink

    def Export(  # noqa: N802 (the RPC's name)
        self, request: ts_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ts_pb2.ExportTraceServiceResponse:
        self._sink.headers.append(dict(context.invocation_metadata()))
        self._sink.add(received_spans(request))
        return ts_pb2.ExportTraceServiceResponse()


class _SpanSink:
    """What a receiver keeps, and waiting for it."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        #: each export's headers (HTTP) or metadata (gRPC), names in lower case
        self.headers: list[dict[str, str]] = []

    def add(self, spans: Sequence[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans() if s.trace_id == trace_id]

    def wait_for(
        self,
        condition: Callable[[list[ReceivedSpan]], bool],
        within_s: float,
        what: str,
        flush: Callable[[], object] | None = None,
    ) -> list[ReceivedSpan]:
        """Poll (calling ``flush`` first each round, e.g. the exporter's force_flush) until
        ``condition(spans)``; AssertionError naming ``what`` and listing the spans otherwise."""
        deadline = time.monotonic() + within_s
        while True:
            if flush is not None:
                flush()
            spans = self.spans()
            if condition(spans):
                return spans
            if time.monotonic() >= deadline:
                listing = "\n".join(
                    f"  {s.service} {s.name} trace={s.trace_id} span={s.span_id} "
                    f"parent={s.parent_span_id}"
                    for s in spans
                )
                raise AssertionError(f"{what}: not within {within_s} s; received:\n{listing}")
            time.sleep(0.05)


class OtlpReceiver(_SpanSink):
    """``with OtlpReceiver() as receiver:`` serves OTLP/gRPC on 127.0.0.1:<port> until the block
    ends."""

    def __init__(self, tls: TlsFiles | None = None, client_auth: bool = False) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        ts_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.tls = tls is not None
        if tls is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.server_key.read_bytes(), tls.server_cert.read_bytes())],
                root_certificates=tls.ca.read_bytes() if client_auth else None,
                require_client_auth=client_auth,
            )
            self.port = self._server.add_secure_port("127.0.0.1:0", credentials)

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=1).wait(5)


class OtlpHttpReceiver(_SpanSink):
    """``with OtlpHttpReceiver() as receiver:`` takes OTLP/HTTP protobuf POSTs to ``/v1/traces``
    on 127.0.0.1:<port> until the block ends (bodies with a length or chunked, as Envoy sends
    them); another path, type or an empty body is answered 4xx and kept in ``refused`` (so a
    wrong URL shows up in the test's failure)."""

    PATH = "/v1/traces"

    def __init__(self, tls: TlsFiles | None = None, client_auth: bool = False) -> None:
        super().__init__()
        self.refused: list[str] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self._body()
                if self.headers.get("Content-Encoding", "") == "gzip":
                    body = gzip.decompress(body)
                kind = self.headers.get("Content-Type", "")
                if self.path != sink.PATH or kind != "application/x-protobuf" or not body:
                    sink.refused.append(f"POST {self.path} ({kind}, {len(body)} bytes)")
                    self.send_error(404 if self.path != sink.PATH else 415)
                    return
                sink.headers.append({k.lower(): v for k, v in self.headers.items()})
                sink.add(received_spans(ts_pb2.ExportTraceServiceRequest.FromString(body)))
                answer = ts_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", "0")))
                chunks = []  # Envoy's exporter streams its body in chunks
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self.tls = tls is not None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.server_cert, tls.server_key)
            if client_auth:
                context.load_verify_locations(tls.ca)
                context.verify_mode = ssl.CERT_REQUIRED
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{self.PATH}"

    def __enter__(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
