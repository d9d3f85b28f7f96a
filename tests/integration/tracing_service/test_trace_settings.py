"""TraceSetting on a traced service: the start settings, trace_rate sampling, trace_level OFF,
trace_count, model-scoped settings over the global ones, and clear refusals of what is not
supported, over gRPC and HTTP.
"""

from __future__ import annotations

from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from services.core.tracing_sdk import TraceControl
from tests.integration.tracing_service.helpers import INFER, simple_inputs, traceparent, wait_trace
from tests.otlp_receiver import OtlpReceiver
from tests.support import ServerThread


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
