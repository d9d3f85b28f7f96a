"""OpenTelemetry tracing of real services, exported over OTLP/gRPC to a real receiver.

The SDK is installed once for this test process (``configure_tracing`` with the endpoint of an
``OtlpReceiver`` on port 0, as a service's entry point does from ``OTEL_EXPORTER_OTLP_ENDPOINT``);
the ONNX and Python services run in-process (``ServerThread``) and tritonclient calls them with a
``traceparent`` of its own, so every assertion is about real spans, parented as received.
Nothing sleeps: the exporter is flushed, then the receiver is polled with a deadline.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
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
from services.core.tracing import configure_tracing
from services.core.tracing_sdk import TraceControl
from tests.otlp_receiver import (
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    STATUS_ERROR,
    OtlpReceiver,
    ReceivedSpan,
)
from tests.support import ServerThread, settings_for

SERVICE_NAME = "meshserve-tracing-test"
INFER = "inference.GRPCInferenceService/ModelInfer"

BATCHED = """
name: "batched"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 3000000 }
"""


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def control(receiver: OtlpReceiver) -> Iterator[TraceControl]:
    control = configure_tracing(
        "meshserve-default-name",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": SERVICE_NAME},
    )
    assert control is not None
    try:
        yield control
    finally:
        control.shutdown()


@pytest.fixture(scope="module")
def server(
    control: TraceControl, example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("traced_models")
    shutil.copytree(example_repo / "simple", root / "simple")
    shutil.copytree(example_repo / "simple", root / "batched")
    (root / "batched" / "config.pbtxt").write_text(BATCHED)
    server = ServerThread(settings_for(root), [OnnxRuntime]).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def fresh(control: TraceControl, receiver: OtlpReceiver) -> Iterator[None]:
    """Each test starts from the start settings with nothing received."""
    control.flush()
    receiver.clear()
    yield
    clear = {"trace_level": [], "trace_rate": [], "trace_count": []}
    for model in ("", "simple", "batched"):
        control.settings.update(model, clear)


# ---- helpers -----------------------------------------------------------------------------------
def traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent of a client span: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def simple_inputs(rows: int = 1, module: Any = grpcclient) -> list[Any]:
    a = np.arange(16 * rows, dtype=np.int32).reshape(rows, 16)
    inputs = [module.InferInput(n, [rows, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for item in inputs:
        item.set_data_from_numpy(a)
    return inputs


def one(spans: list[ReceivedSpan], name: str, **where: str) -> ReceivedSpan:
    found = [
        s
        for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in where.items())
    ]
    assert len(found) == 1, f"expected one '{name}' span {where}, got {found}"
    return found[0]


def wait_trace(
    receiver: OtlpReceiver, control: TraceControl, trace_id: str, names: list[str]
) -> list[ReceivedSpan]:
    """The trace's spans once every name in ``names`` arrived (as many times as listed)."""

    def complete(spans: list[ReceivedSpan]) -> bool:
        got = [s.name for s in spans if s.trace_id == trace_id]
        return all(got.count(n) >= names.count(n) for n in names)

    spans = receiver.wait_for(complete, 10, f"trace {trace_id} with {names}", control.flush)
    return [s for s in spans if s.trace_id == trace_id]


def assert_within(child: ReceivedSpan, parent: ReceivedSpan, slack_ns: int = 1_000_000) -> None:
    assert parent.start_ns - slack_ns <= child.start_ns <= child.end_ns
    assert child.end_ns <= parent.end_ns + slack_ns


# ---- spans and their parents -----------------------------------------------------------------
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
    python = ServerThread(settings_for(tmp_path), [PythonRuntime]).start()
    header, trace_id, client_span = traceparent()
    try:
        with grpcclient.InferenceServerClient(python.grpc_url) as client:
            client.infer("bls_python", simple_inputs(), headers={"traceparent": header})
    finally:
        python.stop()
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
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "services.onnx", "--model-repository", str(tmp_path)),
            *("--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = ""
        for line in proc.stdout:  # "listening: gRPC 127.0.0.1:PORT, ..." then "ready: ..."
            if "listening: gRPC" in line:
                port = line.split("listening: gRPC ")[1].split(",")[0].rsplit(":", 1)[1]
            if "ready:" in line:
                break
        assert port, "the service did not say where it listens"
        header, trace_id, client_span = traceparent()
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            client.infer("simple", simple_inputs(), headers={"traceparent": header})
        assert receiver.trace(trace_id) == []  # not yet: the exporter's schedule is a minute
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    spans = receiver.trace(trace_id)
    server_span = one(spans, INFER)
    assert server_span.parent_span_id == client_span
    assert server_span.service == "meshserve-onnx"
    assert {s.name for s in spans} == {INFER, "queue", "compute"}


# ---- TraceSetting ------------------------------------------------------------------------------
def traced_request_ids(receiver: OtlpReceiver, control: TraceControl) -> set[str]:
    control.flush()
    return {str(s.attributes.get("request.id")) for s in receiver.spans() if s.name == INFER}


def test_trace_settings_report_the_start_settings(server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        settings = client.get_trace_settings(as_json=True)["settings"]
    assert settings["trace_level"]["value"] == ["TIMESTAMPS"]
    assert settings["trace_rate"]["value"] == ["1"]
    assert settings["trace_count"]["value"] == ["-1"]
    with httpclient.InferenceServerClient(server.http_url) as client:
        settings = client.get_trace_settings()
        assert "trace" in client.get_server_metadata()["extensions"]
    assert settings["trace_level"] == ["TIMESTAMPS"] and settings["trace_rate"] == "1"


def test_trace_rate_samples_one_request_in_n(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.update_trace_settings(settings={"trace_rate": "0"})
        for n in range(3):
            client.infer("simple", simple_inputs(), request_id=f"zero-{n}")
        assert not traced_request_ids(receiver, control) & {"zero-0", "zero-1", "zero-2"}
        updated = client.update_trace_settings(settings={"trace_rate": "2"}, as_json=True)
        assert updated["settings"]["trace_rate"]["value"] == ["2"]
        for n in range(4):
            client.infer("simple", simple_inputs(), request_id=f"two-{n}")
        traced = traced_request_ids(receiver, control)
        assert {f"two-{n}" for n in range(4)} & traced == {"two-1", "two-3"}


def test_trace_level_off_stops_every_span_even_under_a_sampled_parent(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    header, trace_id, _ = traceparent()
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.update_trace_settings(settings={"trace_level": ["OFF"]})
        client.infer("simple", simple_inputs(), headers={"traceparent": header})
        control.flush()
        assert receiver.trace(trace_id) == []
        # clearing the setting (no value) returns to the start setting
        cleared = client.update_trace_settings(settings={"trace_level": None}, as_json=True)
        assert cleared["settings"]["trace_level"]["value"] == ["TIMESTAMPS"]
        client.infer("simple", simple_inputs(), headers={"traceparent": header})
    wait_trace(receiver, control, trace_id, [INFER])


def test_trace_count_limits_the_traces_then_stops(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.update_trace_settings(settings={"trace_count": "2"})
        for n in range(4):
            client.infer("simple", simple_inputs(), request_id=f"count-{n}")
        left = client.get_trace_settings(as_json=True)["settings"]["trace_count"]["value"]
    assert left == ["0"]
    traced = traced_request_ids(receiver, control)
    assert {f"count-{n}" for n in range(4)} & traced == {"count-0", "count-1"}


def test_model_scoped_settings_override_the_global_ones(
    server: ServerThread, receiver: OtlpReceiver, control: TraceControl
) -> None:
    with httpclient.InferenceServerClient(server.http_url) as client:
        scoped = client.update_trace_settings(
            model_name="simple", settings={"trace_level": ["OFF"]}
        )
        assert scoped["trace_level"] == ["OFF"]
        assert client.get_trace_settings()["trace_level"] == ["TIMESTAMPS"]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.infer("simple", simple_inputs(), request_id="scoped-simple")
        client.infer("batched", simple_inputs(rows=4), request_id="scoped-batched")
        traced = traced_request_ids(receiver, control)
        assert "scoped-batched" in traced and "scoped-simple" not in traced
        client.update_trace_settings(model_name="simple", settings={"trace_level": None})
        client.infer("simple", simple_inputs(), request_id="scoped-again")
    assert "scoped-again" in traced_request_ids(receiver, control)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"trace_file": "/tmp/trace.json"}, "trace_file.*cannot be changed"),
        ({"log_frequency": "10"}, "log_frequency.*cannot be changed"),
        ({"trace_level": ["TENSORS"]}, "TENSORS.*not supported"),
        ({"trace_rate": "often"}, "trace_rate.*integer"),
        ({"trace_count": "-5"}, "trace_count.*>= -1"),
        ({"sampling": "1"}, "unknown trace setting 'sampling'"),
    ],
)
def test_unsupported_settings_are_refused_clearly(
    server: ServerThread, settings: dict[str, Any], message: str
) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match=message) as info:
            client.update_trace_settings(settings=settings)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        # nothing changed
        assert client.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["1"]
    with (
        httpclient.InferenceServerClient(server.http_url) as client,
        pytest.raises(InferenceServerException, match=message),
    ):
        client.update_trace_settings(settings=settings)
