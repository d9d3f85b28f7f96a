"""Python models whose ``execute`` must not run on the service's event loop thread, however
quick it gets: an ``async def execute`` (it runs an event loop of its own) and a model making BLS
calls (a call answered by this same service needs that loop free). Quick batches otherwise run
on the loop (services/core/model.py), so each model is called until its recent execution times
are well below that threshold."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from examples.build_python import build_python_repository
from services.core.gateway_client import GATEWAY_ENV
from services.python.runtime import PythonRuntime
from tests.support import ServerThread, settings_for

CALLS = 40

ADD_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 8
input [
  {{ name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }},
  {{ name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }}
]
output [ {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }} ]
"""

ADD_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    {kind}def execute(self, requests):
        responses = []
        for r in requests:
            a = pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(r, "INPUT1").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", a + b)
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""


def add_model(repo: Path, name: str, kind: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(ADD_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(ADD_MODEL.format(kind=kind))


def inputs(a: np.ndarray) -> list[grpcclient.InferInput]:
    tensors = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for t in tensors:
        t.set_data_from_numpy(a)
    return tensors


def test_async_execute_and_bls_to_this_service_stay_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    build_python_repository(tmp_path, ["bls_python"])
    add_model(tmp_path, "sum_python", "")
    add_model(tmp_path, "async_sum_python", "async ")
    with ServerThread(settings_for(tmp_path), [PythonRuntime]) as server:
        # the service is its own "gateway": bls_python's call to sum_python comes back to it
        monkeypatch.setenv(GATEWAY_ENV, server.grpc_url)
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        with (
            caplog.at_level(logging.INFO),
            grpcclient.InferenceServerClient(server.grpc_url) as client,
        ):
            for _ in range(CALLS):
                got = client.infer("async_sum_python", inputs(a), client_timeout=10)
                np.testing.assert_array_equal(got.as_numpy("OUTPUT0"), 2 * a)
            for _ in range(CALLS):
                got = client.infer(
                    "bls_python",
                    inputs(a),
                    parameters={"bls_model": "sum_python"},
                    client_timeout=10,
                )
                np.testing.assert_array_equal(got.as_numpy("OUTPUT0"), 4 * a)
    assert "model 'bls_python' makes BLS calls: its batches run on worker threads" in caplog.text
