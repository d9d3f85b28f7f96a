"""Triton's gRPC TLS flags on the whole mesh: ``meshserve up --grpc-use-ssl-mutual=true
--grpc-server-cert ... --grpc-server-key ... --grpc-root-cert ...`` makes Envoy's gRPC listener
serve TLS and require a client certificate signed by the root, as tritonserver does.

Stock tritonclient (``ssl=True`` with its certificates) and stock perf_analyzer (``--ssl-grpc-*``)
call through it; a client without a certificate, or in plaintext, is refused at the handshake;
REST stays plaintext (Triton's HTTP endpoint has no TLS); a Python model's decoupled BLS call,
which goes through the gateway, still works (the services use the loopback plaintext twin of the
gRPC listener). Certificates come from a throwaway CA (tests.tls_certs).
"""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from examples.build_python import build_python_repository
from tests.e2e.conformance.test_perf_analyzer import MISSING, PERF_ANALYZER
from tests.e2e.conftest import MeshHandle, up_mesh
from tests.e2e.traffic import simple_inputs
from tests.tls_certs import TlsFiles, make_tls_files, needs_openssl

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
    ),
    needs_openssl,
]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("gateway_tls"))


@pytest.fixture(scope="module")
def mesh(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshHandle]:
    from examples.build_repository import build_repository

    root: Path = tmp_path_factory.mktemp("tls_mesh")
    repo = root / "models"
    repo.mkdir()
    build_repository(repo, ["simple"])
    build_python_repository(repo, ["repeat_python", "bls_decoupled_python"])
    tls_flags = [
        "--grpc-use-ssl-mutual=true",
        *("--grpc-server-cert", str(tls.server_cert)),
        *("--grpc-server-key", str(tls.server_key)),
        *("--grpc-root-cert", str(tls.ca)),
    ]
    with up_mesh(repo, root, *tls_flags) as handle:
        yield handle


def _client(
    mesh: MeshHandle, tls: TlsFiles, *, with_cert: bool
) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        mesh.grpc_url,
        ssl=True,
        root_certificates=str(tls.ca),
        private_key=str(tls.client_key) if with_cert else None,
        certificate_chain=str(tls.client_cert) if with_cert else None,
    )


def test_a_client_with_its_certificate_infers_over_tls(mesh: MeshHandle, tls: TlsFiles) -> None:
    inputs, total = simple_inputs(2)
    with _client(mesh, tls, with_cert=True) as client:
        assert client.is_server_ready() and client.is_model_ready("simple")
        result = client.infer("simple", inputs)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), total)
        assert client.get_model_metadata("simple").name == "simple"


def test_clients_without_a_certificate_or_tls_are_refused(mesh: MeshHandle, tls: TlsFiles) -> None:
    inputs, _ = simple_inputs(1)
    with (
        _client(mesh, tls, with_cert=False) as client,
        pytest.raises(InferenceServerException) as no_cert,
    ):
        client.infer("simple", inputs, client_timeout=10)
    assert no_cert.value.status() == "StatusCode.UNAVAILABLE"
    with (
        grpcclient.InferenceServerClient(mesh.grpc_url) as plain,
        pytest.raises(InferenceServerException) as plaintext,
    ):
        plain.infer("simple", inputs, client_timeout=10)
    assert plaintext.value.status() == "StatusCode.UNAVAILABLE"
    # REST is not TLS, as in Triton; it still serves
    with httpclient.InferenceServerClient(mesh.http_url) as rest:
        assert rest.is_model_ready("simple")


def test_decoupled_bls_still_reaches_the_gateway(mesh: MeshHandle, tls: TlsFiles) -> None:
    values = grpcclient.InferInput("IN", [3], "INT32")
    values.set_data_from_numpy(np.array([3, 1, 4], np.int32))
    with _client(mesh, tls, with_cert=True) as client:
        result = client.infer("bls_decoupled_python", [values], parameters={"bls_mode": "sync"})
    np.testing.assert_array_equal(result.as_numpy("OUT"), np.array([3, 1, 4], np.int32))


@pytest.mark.skipif(bool(MISSING), reason=MISSING)
def test_perf_analyzer_drives_the_mesh_over_mutual_tls(mesh: MeshHandle, tls: TlsFiles) -> None:
    command = [
        *(str(PERF_ANALYZER), "-i", "grpc", "-u", mesh.grpc_url, "-m", "simple"),
        "--ssl-grpc-use-ssl",
        f"--ssl-grpc-root-certifications-file={tls.ca}",
        f"--ssl-grpc-private-key-file={tls.client_key}",
        f"--ssl-grpc-certificate-chain-file={tls.client_cert}",
        *("--measurement-interval", "300", "--stability-percentage", "999"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Successful request count" in output, output[-3000:]
