"""Certificate rotation on the gateway's TLS, with the whole mesh running: ``meshserve up
--grpc-use-ssl-mutual=true`` on certificate files that are then overwritten with another CA's
certificate, key and root. Within a few seconds new connections get the new certificate and are
checked against the new root, with no restart; a connection opened before keeps working; files
that do not belong together (a rotation half done) change nothing. Stock tritonclient over
real TLS; certificates from two throwaway CAs (tests.tls_certs). The control plane serves the
certificates to Envoy as SDS secrets (control_plane/gateway_secrets.py).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from control_plane.gateway_secrets import RELOAD_SECS
from tests.e2e.conftest import MeshHandle, up_mesh, wait_for
from tests.e2e.traffic import simple_inputs
from tests.tls_certs import TlsFiles, make_tls_files, needs_openssl

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
    ),
    needs_openssl,
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TlsFiles, TlsFiles]:
    """The folder the mesh reads (holding CA a's files at first), CA a's and CA b's files."""
    root = tmp_path_factory.mktemp("rotation_certs")
    a, b = make_tls_files(root / "a"), make_tls_files(root / "b")
    live = root / "live"
    live.mkdir()
    _install(live, a)
    return live, a, b


def _install(live: Path, files: TlsFiles, *, key_of: TlsFiles | None = None) -> None:
    """Overwrite the mesh's files in place with ``files`` (the key of ``key_of`` if given)."""
    shutil.copy(files.server_cert, live / "server.pem")
    shutil.copy((key_of or files).server_key, live / "server.key")
    shutil.copy(files.ca, live / "ca.pem")


@pytest.fixture(scope="module")
def mesh(
    pairs: tuple[Path, TlsFiles, TlsFiles], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshHandle]:
    from examples.build_repository import build_repository

    live, _, _ = pairs
    root: Path = tmp_path_factory.mktemp("rotation_mesh")
    repo = root / "models"
    repo.mkdir()
    build_repository(repo, ["simple"])
    tls_flags = [
        "--grpc-use-ssl-mutual=true",
        *("--grpc-server-cert", str(live / "server.pem")),
        *("--grpc-server-key", str(live / "server.key")),
        *("--grpc-root-cert", str(live / "ca.pem")),
    ]
    with up_mesh(repo, root, *tls_flags) as handle:
        yield handle


def _client(mesh: MeshHandle, files: TlsFiles) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        mesh.grpc_url,
        ssl=True,
        root_certificates=str(files.ca),
        private_key=str(files.client_key),
        certificate_chain=str(files.client_cert),
    )


def _infers(client: grpcclient.InferenceServerClient) -> None:
    inputs, total = simple_inputs(1)
    result = client.infer("simple", inputs, client_timeout=10)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), total)


def _new_connection_infers(mesh: MeshHandle, files: TlsFiles) -> bool:
    with _client(mesh, files) as client:
        try:
            _infers(client)
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.UNAVAILABLE", exc
            return False
    return True


def _snapshot(mesh: MeshHandle) -> str:
    doc = mesh.status()
    assert doc is not None
    return str(doc["snapshot_version"])


def test_a_rotated_certificate_is_served_without_a_restart(
    mesh: MeshHandle, pairs: tuple[Path, TlsFiles, TlsFiles]
) -> None:
    live, a, b = pairs
    with _client(mesh, a) as opened_before:
        _infers(opened_before)
        before = _snapshot(mesh)
        _install(live, b)
        wait_for(lambda: _new_connection_infers(mesh, b), 5 * RELOAD_SECS, "CA b's certificate")
        # a new connection of CA a's clients fails both ways now: the gateway's certificate is
        # not signed by a's root, and a's client certificate does not chain to b's
        assert not _new_connection_infers(mesh, a)
        # the connection opened before the rotation still serves: nothing was drained
        _infers(opened_before)
    rotated = _snapshot(mesh)
    assert rotated != before
    mesh.wait_acked(rotated)


def test_files_that_do_not_belong_together_change_nothing(
    mesh: MeshHandle, pairs: tuple[Path, TlsFiles, TlsFiles]
) -> None:
    live, a, b = pairs
    _install(live, b)
    wait_for(lambda: _new_connection_infers(mesh, b), 5 * RELOAD_SECS, "CA b's certificate")
    served = _snapshot(mesh)
    _install(live, b, key_of=a)  # b's certificate with a's key: half a rotation
    time.sleep(2.5 * RELOAD_SECS)  # the control plane read the files twice meanwhile
    assert _snapshot(mesh) == served
    assert _new_connection_infers(mesh, b)
    _install(live, a)  # the rotation completed: a's pair, whole
    wait_for(lambda: _new_connection_infers(mesh, a), 5 * RELOAD_SECS, "CA a's certificate")
