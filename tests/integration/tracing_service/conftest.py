"""The tracing package's fixtures: an OTLP receiver, the SDK installed once, a traced service.

The SDK is installed once for this test process (``configure_tracing`` with the endpoint of an
``OtlpReceiver`` on port 0, as a service's entry point does from ``OTEL_EXPORTER_OTLP_ENDPOINT``);
the ONNX and Python services run in-process (``ServerThread``) and tritonclient calls them with a
``traceparent`` of its own, so every assertion is about real spans, parented as received.
Nothing sleeps: the exporter is flushed, then the receiver is polled with a deadline.
The fixtures are package-scoped: installed and started once for the package's test modules, and
stopped (the SDK shut down) after its last test.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.tracing import configure_tracing
from services.core.tracing_sdk import TraceControl
from tests.integration.tracing_service.helpers import SERVICE_NAME
from tests.otlp_receiver import OtlpReceiver
from tests.support import ServerThread, settings_for

BATCHED = """
name: "batched"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 3000000 }
"""


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="package")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
def server(
    control: TraceControl, example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("traced_models")
    shutil.copytree(example_repo / "simple", root / "simple")
    shutil.copytree(example_repo / "simple", root / "batched")
    (root / "batched" / "config.pbtxt").write_text(BATCHED)
    with ServerThread(settings_for(root), [OnnxRuntime]) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(control: TraceControl, receiver: OtlpReceiver) -> Iterator[None]:
    """Each test starts from the start settings with nothing received."""
    control.flush()
    receiver.clear()
    yield
    clear = {"trace_level": [], "trace_rate": [], "trace_count": []}
    for model in ("", "simple", "batched"):
        control.settings.update(model, clear)
