"""Spans of real services and their parents: the server span continues the client's trace,
queue and compute spans sit under it (compute with the size of the whole batch), errors are
recorded, streams get a span per request, HTTP is traced too, health probes are not, a BLS call
carries the trace on, and a service process flushes its spans when it stops.
"""

from __future__ import annotations

import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from protos.gen.health import health_pb2, health_pb2_grpc
from services.core.tracing_sdk import TraceControl
from tests.integration.tracing_service.helpers import (
    INFER,
    SERVICE_NAME,
    assert_within,
    one,
    simple_inputs,
    traceparent,
    wait_trace,
)
from tests.otlp_receiver import (
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    STATUS_ERROR,
    OtlpReceiver,
)
from tests.support import ServerThread, service_process, settings_for


def test_model_infer_server_span_continues_the_client_trace(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    header, trace_id, client_span = traceparent()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.infer(
            "simple", simple_inputs(2), request_id="req-7", headers={"traceparent": header}
        )
    spans = wait_trace(receiver, control, trace_id, [INFER, "queue", "compute"])

    server_span = one(spans, INFER)
    assert server_span.parent_span_id == client_span
    assert server_span.kind == SPAN_KIND_SERVER
    assert server_span.service == SERVICE_NAME
    assert server_span.attributes["model.name"] == "simple"
    assert server_span.attributes["model.version"] == "1"
    assert server_span.attributes["request.id"] == "req-7"
    assert server_span.attributes["rpc.system"] == "grpc"
    assert server_span.status_code != STATUS_ERROR

    queue, compute = one(spans, "queue"), one(spans, "compute")
    for child in (queue, compute):
        assert child.parent_span_id == server_span.span_id
        assert child.attributes["model.name"] == "simple"
        assert_within(child, server_span)
    assert queue.end_ns <= compute.start_ns + 1000
    assert compute.attributes["batch.size"] == 2  # the request's two rows were the whole batch


def test_compute_span_carries_the_size_of_the_whole_batch(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    """Four callers, one batch (preferred size 4): each compute span says batch.size 4."""
    calls = [traceparent() for _ in range(4)]

    def call(header: str) -> None:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            client.infer("batched", simple_inputs(), headers={"traceparent": header})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(call, [c[0] for c in calls]))
    computes = []
    for _, trace_id, client_span in calls:
        spans = wait_trace(receiver, control, trace_id, [INFER, "compute"])
        server_span = one(spans, INFER)
        assert server_span.parent_span_id == client_span
        compute = one(spans, "compute")
        assert compute.parent_span_id == server_span.span_id
        computes.append(compute)
    assert [c.attributes["batch.size"] for c in computes] == [4, 4, 4, 4]
    starts = [c.start_ns for c in computes]  # one batch: one start (up to clock conversion)
    assert max(starts) - min(starts) < 1_000_000


def test_failed_request_span_records_the_error(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    header, trace_id, _ = traceparent()
    bad = [grpcclient.InferInput("INPUT0", [1, 16], "INT32")]
    bad[0].set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
    with (
        grpcclient.InferenceServerClient(server.grpc_url) as client,
        pytest.raises(InferenceServerException, match="INPUT1"),
    ):
        client.infer("simple", bad, headers={"traceparent": header})
    server_span = one(wait_trace(receiver, control, trace_id, [INFER]), INFER)
    assert server_span.status_code == STATUS_ERROR
    assert "INPUT1" in server_span.status_message
    assert (
        server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )


def test_stream_gets_a_server_span_per_request(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    header, trace_id, client_span = traceparent()
    answers: list[Any] = []
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(
            lambda result, error: answers.append(error or result), headers={"traceparent": header}
        )
        for n in range(2):
            client.async_stream_infer("simple", simple_inputs(), request_id=f"s{n}")
        client.stop_stream()
    assert len(answers) == 2 and all(not isinstance(a, Exception) for a in answers)
    stream = "inference.GRPCInferenceService/ModelStreamInfer"
    spans = wait_trace(receiver, control, trace_id, [stream, stream, "compute", "compute"])
    for request_id in ("s0", "s1"):
        span = one(spans, stream, **{"request.id": request_id})
        assert span.parent_span_id == client_span
        children = sorted(s.name for s in spans if s.parent_span_id == span.span_id)
        assert children == ["compute", "queue"]


def test_http_infer_is_traced_from_the_traceparent_header(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    header, trace_id, client_span = traceparent()
    with httpclient.InferenceServerClient(server.http_url) as client:
        client.infer(
            "simple",
            simple_inputs(module=httpclient),
            request_id="http-1",
            headers={"traceparent": header},
        )
    name = "POST /v2/models/{model}/infer"
    spans = wait_trace(receiver, control, trace_id, [name, "queue", "compute"])
    span = one(spans, name)
    assert span.parent_span_id == client_span and span.kind == SPAN_KIND_SERVER
    assert span.attributes["model.name"] == "simple"
    assert span.attributes["request.id"] == "http-1"
    assert span.attributes["http.response.status_code"] == 200
    assert one(spans, "compute").parent_span_id == span.span_id


def test_health_probes_are_not_traced(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    header, _, _ = traceparent()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_live(headers={"traceparent": header})
        assert client.is_server_ready(headers={"traceparent": header})
        assert client.is_model_ready("simple", headers={"traceparent": header})
        client.get_model_metadata("simple", headers={"traceparent": header})  # traced: the marker
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        assert (
            stub.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.is_server_live(headers={"traceparent": header})
        assert client.is_model_ready("simple", headers={"traceparent": header})
    receiver.wait_for(
        lambda spans: any(s.name.endswith("/ModelMetadata") for s in spans),
        10,
        "the ModelMetadata span",
        control.flush,
    )
    control.flush()
    names = [s.name for s in receiver.spans()]
    assert names == ["inference.GRPCInferenceService/ModelMetadata"]


def test_bls_call_carries_the_trace_to_the_model_it_calls(
    server: ServerThread,
    receiver: OtlpReceiver,
    control: TraceControl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python model → BLS → ``simple`` (here the ONNX service stands in for the gateway)."""
    from examples.build_python import build_python_repository
    from services.core import gateway_client
    from services.python.runtime import PythonRuntime

    build_python_repository(tmp_path, ["bls_python"])
    monkeypatch.setenv(gateway_client.GATEWAY_ENV, server.grpc_url)
    with ServerThread(settings_for(tmp_path), [PythonRuntime]) as python:
        header, trace_id, client_span = traceparent()
        with grpcclient.InferenceServerClient(python.grpc_url) as client:
            client.infer("bls_python", simple_inputs(), headers={"traceparent": header})
    bls_call = "BLS inference.GRPCInferenceService/ModelInfer"
    spans = wait_trace(receiver, control, trace_id, [INFER, INFER, bls_call])
    outer = one(spans, INFER, **{"model.name": "bls_python"})
    assert outer.parent_span_id == client_span
    call = one(spans, bls_call)
    assert call.kind == SPAN_KIND_CLIENT and call.parent_span_id == outer.span_id
    inner = one(spans, INFER, **{"model.name": "simple"})
    assert inner.parent_span_id == call.span_id


def test_service_process_flushes_its_spans_when_it_stops(
    receiver: OtlpReceiver, example_repo: Path, tmp_path: Path
) -> None:
    """``python -m services.onnx`` with the standard variables: its batch exporter waits a minute
    between exports, so the span can only arrive through the flush at SIGTERM."""
    shutil.copytree(example_repo / "simple", tmp_path / "simple")
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
    }
    env.pop("OTEL_SERVICE_NAME", None)
    with service_process(tmp_path, [], env) as (proc, port):
        header, trace_id, client_span = traceparent()
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            client.infer("simple", simple_inputs(), headers={"traceparent": header})
        assert receiver.trace(trace_id) == []  # not yet: the exporter's schedule is a minute
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    spans = receiver.trace(trace_id)
    server_span = one(spans, INFER)
    assert server_span.parent_span_id == client_span
    assert server_span.service == "meshserve-onnx"
    assert {s.name for s in spans} == {INFER, "queue", "compute"}
