"""The whole mesh exporting spans to a collector that wants TLS and headers, as a hosted one does.

Two meshes, each with a real receiver of this test that serves TLS with a certificate signed by a
throwaway CA (``tests.tls_certs``) and answers only exports that carry the expected headers:

- Triton's flags, ``--trace-config opentelemetry,url=https://...`` (OTLP/HTTP), with the CA in
  ``OTEL_EXPORTER_OTLP_CERTIFICATE``, an API key in ``OTEL_EXPORTER_OTLP_HEADERS`` and resource
  attributes from ``opentelemetry,resource=`` and ``OTEL_RESOURCE_ATTRIBUTES``;
- ``OTEL_EXPORTER_OTLP_ENDPOINT=https://...`` (OTLP/gRPC) with mutual TLS: the receiver asks for a
  client certificate, given in ``OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`` / ``..._CLIENT_KEY``.

In both, Envoy (configured by the control plane) and the ONNX service (the SDK's exporter) must
deliver their spans of one trace. The receivers hold plaintext exports to nothing: a span only
arrives over TLS.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.conftest import MeshHandle, up_mesh
from tests.e2e.traffic import simple_inputs
from tests.integration.tracing_service.helpers import INFER, traceparent
from tests.otlp_receiver import OtlpHttpReceiver, OtlpReceiver, ReceivedSpan
from tests.tls_certs import TlsFiles, make_tls_files, needs_openssl

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
    ),
    needs_openssl,
]

GATEWAY = "meshserve-gateway"
SERVICE = "meshserve-onnx"
#: Envoy exports every 5 s; the services every 100 ms here
WITHIN_S = 30
API_KEY = "Bearer s3cret key"
_CLEARED = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SERVICE_NAME",
    "OTEL_BSP_SCHEDULE_DELAY",
)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _mesh(root: Path, flags: list[str], env: dict[str, str]) -> Iterator[MeshHandle]:
    from examples.build_repository import build_repository

    repo = root / "models"
    repo.mkdir()
    build_repository(repo, ["simple"])
    with pytest.MonkeyPatch.context() as patch:
        for name in _CLEARED:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        with up_mesh(repo, root, *flags) as handle:
            yield handle


def _one_trace(mesh: MeshHandle, receiver: Any) -> list[ReceivedSpan]:
    """One traced call through the gateway; its spans from the gateway and the service."""
    header, trace_id, client_span = traceparent()
    inputs, _ = simple_inputs(2)
    with grpcclient.InferenceServerClient(mesh.grpc_url) as client:
        client.infer("simple", inputs, headers={"traceparent": header})

    def complete(spans: list[ReceivedSpan]) -> bool:
        return {s.service for s in spans if s.trace_id == trace_id} >= {GATEWAY, SERVICE}

    spans = receiver.wait_for(complete, WITHIN_S, f"trace {trace_id} over TLS")
    mine = [s for s in spans if s.trace_id == trace_id]
    gateway = [s for s in mine if s.service == GATEWAY]
    assert len(gateway) == 1 and gateway[0].parent_span_id == client_span
    service = [s for s in mine if s.name == INFER]
    assert len(service) == 1 and service[0].parent_span_id == gateway[0].span_id
    return mine


@pytest.fixture(scope="module")
def https_receiver(tls: TlsFiles) -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver(tls=tls) as r:
        yield r


@pytest.fixture(scope="module")
def https_mesh(
    https_receiver: OtlpHttpReceiver, tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshHandle]:
    flags = [
        f"--trace-config=opentelemetry,url={https_receiver.endpoint}",
        "--trace-config=opentelemetry,resource=deployment.environment=staging",
        "--trace-config=opentelemetry,bsp_schedule_delay=100",
        "--trace-config=level=TIMESTAMPS",
        "--trace-config=rate=1",
    ]
    env = {
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(tls.ca),
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20s3cret%20key,x-team=ranking",
        "OTEL_RESOURCE_ATTRIBUTES": "team=search,deployment.environment=dev",
    }
    yield from _mesh(tmp_path_factory.mktemp("https_mesh"), flags, env)


def test_the_mesh_exports_over_https_with_headers_and_resource(
    https_mesh: MeshHandle, https_receiver: OtlpHttpReceiver
) -> None:
    spans = _one_trace(https_mesh, https_receiver)
    for span in spans:
        # the flag's attribute wins over the variable's, as in the SDK; both reach Envoy too
        assert span.resource["deployment.environment"] == "staging", span
        assert span.resource["team"] == "search", span
    assert https_receiver.headers and https_receiver.refused == []
    for headers in https_receiver.headers:  # every export, Envoy's and the service's
        assert (headers.get("authorization"), headers.get("x-team")) == (API_KEY, "ranking")


@pytest.fixture(scope="module")
def grpcs_receiver(tls: TlsFiles) -> Iterator[OtlpReceiver]:
    with OtlpReceiver(tls=tls, client_auth=True) as r:
        yield r


@pytest.fixture(scope="module")
def grpcs_mesh(
    grpcs_receiver: OtlpReceiver, tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshHandle]:
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": grpcs_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(tls.ca),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(tls.client_cert),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(tls.client_key),
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=k1",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    yield from _mesh(tmp_path_factory.mktemp("grpcs_mesh"), [], env)


def test_the_mesh_exports_over_grpc_with_mutual_tls(
    grpcs_mesh: MeshHandle, grpcs_receiver: OtlpReceiver
) -> None:
    _one_trace(grpcs_mesh, grpcs_receiver)
    assert grpcs_receiver.headers
    assert all(h.get("x-api-key") == "k1" for h in grpcs_receiver.headers)
