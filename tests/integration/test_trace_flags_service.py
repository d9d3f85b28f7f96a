"""Triton's tracing flags on a real service process: ``--trace-config mode=opentelemetry`` and
``opentelemetry,url=`` send spans over OTLP/HTTP to a real receiver of this test
(``OtlpHttpReceiver``), with the resource, batching and sampling settings given; Triton's
default level OFF sends nothing until TraceSetting turns it on; Triton's trace-file flags and
TIMESTAMPS with no collector stop the service at start with what to do instead.

Each service runs as its own process (the OpenTelemetry SDK is installed once per process), with
no ``OTEL_*`` variables, so only the flags can have set its tracing up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from examples.build_repository import build_repository
from tests.integration.tracing_service.helpers import INFER, simple_inputs, traceparent
from tests.otlp_receiver import SPAN_KIND_SERVER, OtlpHttpReceiver, ReceivedSpan
from tests.support import service_process

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def _of_trace(trace_id: str, names: set[str]) -> Callable[[list[ReceivedSpan]], bool]:
    def complete(spans: list[ReceivedSpan]) -> bool:
        return names <= {s.name for s in spans if s.trace_id == trace_id}

    return complete


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trace_flags")
    build_repository(root, ["simple"])
    return root


def test_trace_config_exports_over_otlp_http_with_the_settings_given(repo: Path) -> None:
    with OtlpHttpReceiver() as receiver:
        flags = [
            "--trace-config=mode=opentelemetry",
            f"--trace-config=opentelemetry,url=127.0.0.1:{receiver.port}/v1/traces",
            "--trace-config=opentelemetry,resource=service.name=triton-flags",
            "--trace-config=opentelemetry,resource=deployment.environment=test",
            "--trace-config=opentelemetry,bsp_schedule_delay=50",
            "--trace-config=level=TIMESTAMPS",
            "--trace-config=rate=1",
            "--trace-config=count=5",
        ]
        with service_process(repo, flags, _env()) as (_, port):
            url = f"127.0.0.1:{port}"
            with grpcclient.InferenceServerClient(url) as client:
                settings = client.get_trace_settings(as_json=True)["settings"]
                assert settings["trace_level"]["value"] == ["TIMESTAMPS"]
                assert settings["trace_rate"]["value"] == ["1"]
                assert settings["trace_count"]["value"] == ["5"]
                header, trace_id, client_span = traceparent()
                client.infer("simple", simple_inputs(), headers={"traceparent": header})
                client.infer("simple", simple_inputs())  # no caller: rate 1 starts a trace
            # the schedule given is 50 ms (the default, 5 s, would not make it in 3 s)
            spans = receiver.wait_for(
                _of_trace(trace_id, {INFER, "queue", "compute"}),
                3,
                "the traced request's spans over OTLP/HTTP",
            )
            server = [s for s in spans if s.trace_id == trace_id and s.name == INFER]
            assert len(server) == 1 and server[0].parent_span_id == client_span
            assert server[0].kind == SPAN_KIND_SERVER
            assert server[0].attributes["model.name"] == "simple"
            assert server[0].service == "triton-flags"
            receiver.wait_for(
                lambda got: len({s.trace_id for s in got if s.name == INFER}) == 2,
                3,
                "a second trace, started by the service itself",
            )
            with grpcclient.InferenceServerClient(url) as client:  # two of five taken
                left = client.get_trace_settings(as_json=True)["settings"]["trace_count"]
                assert left["value"] == ["3"]
        assert receiver.refused == []


def test_tritons_default_level_off_sends_nothing_until_trace_setting(repo: Path) -> None:
    with OtlpHttpReceiver() as receiver:
        flags = [
            f"--trace-config=opentelemetry,url=127.0.0.1:{receiver.port}",  # path: /v1/traces
            "--trace-config=opentelemetry,bsp_schedule_delay=50",
        ]
        with service_process(repo, flags, _env()) as (_, port):
            with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
                settings = client.get_trace_settings(as_json=True)["settings"]
                assert settings["trace_level"]["value"] == ["OFF"]
                assert settings["trace_rate"]["value"] == ["1000"]
                off_header, off_trace, _ = traceparent()
                client.infer("simple", simple_inputs(), headers={"traceparent": off_header})
                client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
                header, trace_id, _ = traceparent()
                client.infer("simple", simple_inputs(), headers={"traceparent": header})
            spans = receiver.wait_for(
                _of_trace(trace_id, {INFER, "compute"}),
                5,
                "spans once TraceSetting set TIMESTAMPS",
            )
            # exported in order, so the earlier request's spans would be here by now
            assert [s for s in spans if s.trace_id == off_trace] == []
        assert receiver.refused == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trace-file=/tmp/trace.json"], "trace files (mode triton) are not written here"),
        (["--trace-config=triton,log-frequency=50"], "--trace-config mode=opentelemetry"),
        (["--trace-config=level=TIMESTAMPS"], "no collector is named"),
    ],
)
def test_trace_files_and_spans_with_no_collector_stop_the_service(
    repo: Path, flags: list[str], message: str
) -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "services.onnx", "--model-repository", str(repo)),
            *("--grpc-port=0", "--http-port=-1", "--metrics-port=-1", *flags),
        ],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stdout + done.stderr
    assert "ready:" not in done.stdout + done.stderr
