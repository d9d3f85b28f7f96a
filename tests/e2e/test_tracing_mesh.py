"""One trace across the whole mesh: client → Envoy → service (→ BLS call or ensemble step → the
called model's service, routed by the gateway's routes without the gateway hop).

The mesh starts with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a real OTLP receiver of this
test: the control plane configures Envoy's OpenTelemetry tracer over xDS (service
``meshserve-gateway``) and every service process exports its own spans. The assertions follow the
parent ids hop by hop. The services' exporters run in other processes, so they export on a short
schedule (``OTEL_BSP_SCHEDULE_DELAY``) and the receiver is polled with a deadline; Envoy sends its
spans every few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from examples.build_ensemble import build_ensemble_repository
from examples.build_python import build_python_repository
from tests.e2e.conftest import MeshHandle, running_mesh, wait_for
from tests.e2e.traffic import simple_inputs
from tests.otlp_receiver import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
)

GATEWAY = "meshserve-gateway"
INFER = "inference.GRPCInferenceService/ModelInfer"
#: Envoy exports every 5 s (or every 5 spans); services every 100 ms here
WITHIN_S = 30


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def mesh(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshHandle]:
    from examples.build_repository import build_repository

    root: Path = tmp_path_factory.mktemp("traced_mesh")
    repo = root / "models"
    repo.mkdir()
    build_repository(repo, ["simple"])
    build_python_repository(repo, ["bls_python"])
    build_ensemble_repository(repo, ["branch_join"])
    with pytest.MonkeyPatch.context() as env:
        # the supervisor's processes (control plane, services) inherit these
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        with running_mesh(repo, root) as handle:
            yield handle


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


def only(spans: list[ReceivedSpan], what: str) -> ReceivedSpan:
    assert len(spans) == 1, f"expected one {what}, got {spans}"
    return spans[0]


def test_gateway_span_is_the_parent_of_the_service_span(
    mesh: MeshHandle, receiver: OtlpReceiver
) -> None:
    header, trace_id, client_span = traceparent()
    inputs, _ = simple_inputs(2)
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        client.infer("simple", inputs, request_id="mesh-1", headers={"traceparent": header})

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return {s.service for s in mine} >= {GATEWAY, "meshserve-onnx"} and "compute" in {
            s.name for s in mine
        }

    spans = receiver.wait_for(complete, WITHIN_S, f"trace {trace_id} from gateway and service")
    spans = [s for s in spans if s.trace_id == trace_id]
    gateway = only([s for s in spans if s.service == GATEWAY], "gateway span")
    assert gateway.parent_span_id == client_span
    assert gateway.kind == SPAN_KIND_SERVER

    service = only(children(spans, gateway), "service span under the gateway's")
    assert (service.service, service.name, service.kind) == ("meshserve-onnx", INFER, 2)
    assert service.attributes["model.name"] == "simple"
    assert service.attributes["request.id"] == "mesh-1"
    assert sorted(s.name for s in children(spans, service)) == ["compute", "queue"]


def test_the_gateway_starts_a_trace_when_the_client_sends_none(
    mesh: MeshHandle, receiver: OtlpReceiver
) -> None:
    inputs, _ = simple_inputs(3)
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        client.infer("simple", inputs, request_id="mesh-rootless")

    def service_span(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
        found = [
            s
            for s in spans
            if s.name == INFER and s.attributes.get("request.id") == "mesh-rootless"
        ]
        return found[0] if found else None

    def complete(spans: list[ReceivedSpan]) -> bool:
        span = service_span(spans)
        return span is not None and any(
            s.span_id == span.parent_span_id and s.service == GATEWAY for s in spans
        )

    spans = receiver.wait_for(complete, WITHIN_S, "a gateway-rooted trace")
    service = service_span(spans)
    assert service is not None
    gateway = only([s for s in spans if s.span_id == service.parent_span_id], "gateway span")
    assert gateway.trace_id == service.trace_id and gateway.parent_span_id == ""


def test_bls_call_continues_the_trace(mesh: MeshHandle, receiver: OtlpReceiver) -> None:
    """client → gateway → Python service → BLS client span → ONNX service: the BLS call goes
    straight to the replica the gateway's routes pick, so no gateway span sits under it."""
    header, trace_id, client_span = traceparent()
    inputs, _ = simple_inputs(1)
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        client.infer("bls_python", inputs, headers={"traceparent": header})

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        return (
            any(s.service == GATEWAY for s in mine)
            and any(s.service == "meshserve-onnx" and s.name == "compute" for s in mine)
            and any(s.kind == SPAN_KIND_CLIENT for s in mine)
        )

    spans = receiver.wait_for(complete, WITHIN_S, f"trace {trace_id} across the BLS call")
    spans = [s for s in spans if s.trace_id == trace_id]
    outer_gateway = only(
        [s for s in spans if s.parent_span_id == client_span], "gateway span under the client"
    )
    python = only(children(spans, outer_gateway), "Python service span")
    assert (python.service, python.attributes["model.name"]) == ("meshserve-python", "bls_python")
    call = only([s for s in children(spans, python) if s.kind == SPAN_KIND_CLIENT], "BLS call")
    onnx = only(children(spans, call), "ONNX service span under the BLS call")
    assert (onnx.service, onnx.attributes["model.name"]) == ("meshserve-onnx", "simple")
    assert [s for s in spans if s.service == GATEWAY] == [outer_gateway]


#: branch_join's steps (examples/build_ensemble.py) and the services that run them
BRANCH_JOIN_STEPS = {
    "slow_a_python": "meshserve-python",
    "slow_b_python": "meshserve-python",
    "simple": "meshserve-onnx",
}


def test_ensemble_trace_has_every_step_and_its_service(
    mesh: MeshHandle, receiver: OtlpReceiver
) -> None:
    """client → gateway → ensemble service → one CLIENT span per step → the step's service
    (two Python branches, then the ONNX join), all in the client's trace. The steps go straight
    to the replicas the gateway's routes pick (services/core/mesh_caller.py): no gateway span
    sits between a step and its service."""
    header, trace_id, client_span = traceparent()
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    tensor.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        client.infer("branch_join", [tensor], request_id="ens-1", headers={"traceparent": header})

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.trace_id == trace_id]
        served = {s.attributes.get("model.name") for s in mine if s.name == INFER and s.kind == 2}
        return any(s.service == GATEWAY for s in mine) and served >= {
            "branch_join",
            *BRANCH_JOIN_STEPS,
        }

    spans = receiver.wait_for(complete, WITHIN_S, f"trace {trace_id} through the ensemble")
    spans = [s for s in spans if s.trace_id == trace_id]
    outer = only([s for s in spans if s.parent_span_id == client_span], "gateway span")
    ensemble = only(children(spans, outer), "ensemble service span")
    assert (ensemble.service, ensemble.attributes["model.name"]) == (
        "meshserve-ensemble",
        "branch_join",
    )
    steps = [s for s in children(spans, ensemble) if s.kind == SPAN_KIND_CLIENT]
    assert sorted(s.attributes["model.name"] for s in steps) == sorted(BRANCH_JOIN_STEPS)
    for step in steps:
        model = step.attributes["model.name"]
        assert step.attributes["request.id"] == "ens-1"
        served = only(children(spans, step), f"{model}'s service span")
        assert (served.service, served.attributes["model.name"]) == (
            BRANCH_JOIN_STEPS[model],
            model,
        )
        assert served.start_ns >= step.start_ns
    # the join ran after both branches ended; the branches overlapped
    by_model = {s.attributes["model.name"]: s for s in steps}
    a, b, join = by_model["slow_a_python"], by_model["slow_b_python"], by_model["simple"]
    assert join.start_ns >= max(a.end_ns, b.end_ns)
    assert a.start_ns < b.end_ns and b.start_ns < a.end_ns


def gateway_sampling(mesh: MeshHandle) -> set[float]:
    """Envoy's random-sampling percentages, from its admin config dump (both listeners)."""
    url = f"{mesh.admin_url}/config_dump?resource=dynamic_listeners"
    with urllib.request.urlopen(url, timeout=5) as r:
        dump = json.loads(r.read())
    found = set()
    for entry in dump["configs"]:
        listener = entry.get("active_state", {}).get("listener", {})
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                tracing = f.get("typed_config", {}).get("tracing")
                if tracing is not None:
                    # Envoy's default is 100%; a present Percent whose value is 0 prints as {}
                    sampling = tracing.get("random_sampling")
                    found.add(100.0 if sampling is None else float(sampling.get("value", 0.0)))
    return found


def test_trace_setting_through_the_gateway_reaches_envoy_sampling(mesh: MeshHandle) -> None:
    """A global TraceSetting is made on every service and the gateway follows it: Envoy, which
    starts the traces of requests that come without one, samples 1 in trace_rate."""
    assert gateway_sampling(mesh) == {100.0}
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        try:
            client.update_trace_settings(settings={"trace_rate": "4"})
            wait_for(lambda: gateway_sampling(mesh) == {25.0}, 10, "Envoy sampling 25%")
            with httpclient.InferenceServerClient(mesh.http_url) as http:
                http.update_trace_settings(settings={"trace_level": ["OFF"]})
            wait_for(lambda: gateway_sampling(mesh) == {0.0}, 10, "Envoy sampling 0%")
        finally:
            # cleared settings go back to their start values (the other tests sample all)
            client.update_trace_settings(settings={"trace_rate": None, "trace_level": None})
        wait_for(lambda: gateway_sampling(mesh) == {100.0}, 10, "Envoy sampling 100% again")


def test_trace_count_takes_whole_traces_once_each_in_the_mesh(
    mesh: MeshHandle, receiver: OtlpReceiver
) -> None:
    """trace_count 2, set through the gateway on every service, then 4 sampled ensemble calls:
    the first 2 traces are whole (the ensemble and every step's service), the other 2 have no
    service span. Each trace is counted once, by the service it enters the mesh at; counted per
    service, the Python service (two steps per call) would have cut the second trace short."""
    x = np.arange(16, dtype=np.int32).reshape(1, 16)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    tensor.set_data_from_numpy(x)
    traces = []
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        try:
            client.update_trace_settings(settings={"trace_count": "2"})
            for _ in range(4):
                header, trace_id, _ = traceparent()
                client.infer("branch_join", [tensor], headers={"traceparent": header})
                traces.append(trace_id)
            assert client.get_trace_settings().settings["trace_count"].value == ["0"]
        finally:
            client.update_trace_settings(settings={"trace_count": None})

    def served(spans: list[ReceivedSpan], trace_id: str) -> set[str]:
        return {
            str(s.attributes.get("model.name"))
            for s in spans
            if s.trace_id == trace_id
            and s.name == INFER
            and s.kind == SPAN_KIND_SERVER
            and s.service != GATEWAY
        }

    whole = {"branch_join", *BRANCH_JOIN_STEPS}
    spans = receiver.wait_for(
        lambda got: all(served(got, t) >= whole for t in traces[:2]),
        WITHIN_S,
        "the first two traces, whole",
    )
    time.sleep(1.0)  # the services export every 100 ms: anything of the last two is in by now
    spans = receiver.spans()
    assert [served(spans, t) for t in traces[2:]] == [set(), set()]
