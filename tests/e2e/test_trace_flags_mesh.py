"""A Triton launch script's tracing flags on the whole mesh: ``meshserve up --trace-config
mode=opentelemetry --trace-config opentelemetry,url=... --trace-config level=TIMESTAMPS`` makes
Envoy (configured by the control plane over xDS, exporting with its OTLP/HTTP ``http_service``)
and the ONNX service (the SDK's OTLP/HTTP exporter) send one trace to a real OTLP/HTTP receiver
of this test. The mesh's settings come from ``meshserve up``'s own parser, and no ``OTEL_*``
variable is set, so only the flags can have turned tracing on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.conftest import MeshHandle, up_mesh
from tests.e2e.traffic import simple_inputs
from tests.integration.tracing_service.helpers import INFER, traceparent
from tests.otlp_receiver import SPAN_KIND_SERVER, OtlpHttpReceiver, ReceivedSpan

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
)

GATEWAY = "meshserve-gateway"
#: Envoy exports every 5 s; the services every 100 ms here
WITHIN_S = 30


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def mesh(
    receiver: OtlpHttpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshHandle]:
    from examples.build_repository import build_repository

    root: Path = tmp_path_factory.mktemp("trace_flags_mesh")
    repo = root / "models"
    repo.mkdir()
    build_repository(repo, ["simple"])
    flags = [
        "--trace-config=mode=opentelemetry",
        f"--trace-config=opentelemetry,url=127.0.0.1:{receiver.port}/v1/traces",
        "--trace-config=opentelemetry,bsp_schedule_delay=100",
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=rate=1",
    ]
    with pytest.MonkeyPatch.context() as env:
        for name in (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_TRACES_SAMPLER",
            "OTEL_TRACES_SAMPLER_ARG",
        ):
            env.delenv(name, raising=False)
        with up_mesh(repo, root, *flags) as handle:
            yield handle


def test_gateway_and_service_export_one_trace_over_otlp_http(
    mesh: MeshHandle, receiver: OtlpHttpReceiver
) -> None:
    header, trace_id, client_span = traceparent()
    inputs, _ = simple_inputs(2)
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        client.infer("simple", inputs, request_id="flags-1", headers={"traceparent": header})
        client.infer("simple", inputs, request_id="flags-rootless")  # rate=1: traced too

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        rootless = [s for s in spans if s.attributes.get("request.id") == "flags-rootless"]
        return bool(rootless) and {s.service for s in mine} >= {GATEWAY, "meshserve-onnx"}

    spans = receiver.wait_for(complete, WITHIN_S, f"trace {trace_id} over OTLP/HTTP")
    mine = [s for s in spans if s.trace_id == trace_id]
    gateway = [s for s in mine if s.service == GATEWAY]
    assert len(gateway) == 1 and gateway[0].parent_span_id == client_span
    assert gateway[0].kind == SPAN_KIND_SERVER
    service = [s for s in mine if s.name == INFER]
    assert len(service) == 1 and service[0].parent_span_id == gateway[0].span_id
    assert service[0].attributes["request.id"] == "flags-1"
    assert receiver.refused == []
    # the mesh's own health checks (Envoy's and the control plane's polls) start no trace
    assert not [s for s in spans if "health" in s.name or "serving" in s.name], {
        s.name for s in spans
    }
