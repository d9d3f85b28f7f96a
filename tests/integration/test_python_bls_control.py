"""Triton's BLS model loading API (``pb_utils.load_model`` / ``unload_model`` /
``is_model_ready``, services/python/bls_control.py) against a real service in explicit mode.

The calls go to the gateway address (``MESHSERVE_GATEWAY``); here that address is the ONNX
service itself, which answers the same RPCs as the gateway's front forwards them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from services.core.gateway_client import GATEWAY_ENV
from services.python import triton_python_backend_utils as pb_utils
from tests.support import ServerThread, settings_for


@pytest.fixture
def service(example_repo: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    from services.onnx.runtime import OnnxRuntime

    settings = settings_for(example_repo, model_control_mode="explicit", startup_models=("simple",))
    with ServerThread(settings, [OnnxRuntime]) as server:
        monkeypatch.setenv(GATEWAY_ENV, server.grpc_url)
        yield server


def test_a_python_model_loads_checks_and_unloads_models(service: ServerThread) -> None:
    assert pb_utils.is_model_ready("simple")
    assert pb_utils.is_model_ready("simple", "1")
    assert not pb_utils.is_model_ready("simple", "9")
    assert not pb_utils.is_model_ready("mlp")
    assert not pb_utils.is_model_ready("no_such_model")

    pb_utils.load_model("mlp")
    assert pb_utils.is_model_ready("mlp")
    pb_utils.unload_model("mlp")
    assert not pb_utils.is_model_ready("mlp")

    # a config override, as Triton's load_model(config=...) sends it
    config = json.dumps({"backend": "onnxruntime", "max_batch_size": 4})
    pb_utils.load_model("mlp", config=config)
    with grpcclient.InferenceServerClient(service.grpc_url) as client:
        assert client.get_model_config("mlp", as_json=True)["config"]["max_batch_size"] == 4


def test_failures_raise_with_the_servers_reason(service: ServerThread) -> None:
    with pytest.raises(pb_utils.TritonModelException, match=r"load_model\('no_such_model'\)"):
        pb_utils.load_model("no_such_model")
    with pytest.raises(pb_utils.TritonModelException, match="NOT_FOUND"):
        pb_utils.unload_model("no_such_model")
    with pytest.raises(pb_utils.TritonModelException, match="file:<version>/<name>"):
        pb_utils.load_model("mlp", files={"1/model.onnx": b""})
    assert pb_utils.is_model_ready("simple")  # and the service still serves
