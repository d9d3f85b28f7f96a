"""Stopping the whole mesh (``meshserve up``'s Ctrl-C) while requests are in flight: each one
finishes, also an ensemble whose later steps start after the stop began (its steps go through
the gateway to other services, which must still be there)."""

from __future__ import annotations

import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.conftest import running_mesh

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None,
    reason="onnxruntime is needed (pip install '.[onnx]')",
)


def _branch_join(client: grpcclient.InferenceServerClient, value: int) -> np.ndarray:
    x = np.full((1, 16), value, dtype=np.int32)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    tensor.set_data_from_numpy(x)
    out = client.infer("branch_join", [tensor], client_timeout=30).as_numpy("OUTPUT0")
    assert out is not None
    return out


def test_stopping_the_mesh_finishes_requests_in_flight(tmp_path: Path) -> None:
    from examples.build_ensemble import build_ensemble_repository

    # branch_join: two 400 ms Python branches, then ``simple`` (ONNX) joins them
    repo = tmp_path / "models"
    build_ensemble_repository(repo, ["branch_join"])
    with running_mesh(repo, tmp_path) as mesh, ThreadPoolExecutor(4) as pool:
        clients = [grpcclient.InferenceServerClient(mesh.grpc_url) for _ in range(4)]
        try:
            # connected and warm, so the calls below are in flight well before the stop
            warm = list(pool.map(_branch_join, clients, range(4)))
            assert all(np.array_equal(w, np.full((1, 16), 3 * v + 1)) for v, w in enumerate(warm))
            calls = [pool.submit(_branch_join, c, v) for v, c in enumerate(clients)]
            time.sleep(0.2)  # the branches run; the join step starts ~0.2 s after the stop began
            assert not any(c.done() for c in calls)
            started = time.monotonic()
            mesh.stop()
            stop_s = time.monotonic() - started
            results = [c.result(timeout=30) for c in calls]
        finally:
            for c in clients:
                c.close()
    for v, out in enumerate(results):
        np.testing.assert_array_equal(out, np.full((1, 16), 3 * v + 1))
    print(f"the mesh stopped in {stop_s:.2f} s")
    assert stop_s < 30
