"""The ONNX service with auto-complete off (``auto_complete_config=False``, what
--disable-auto-complete-config sets): a whole config serves, a model whose config.pbtxt is
missing is UNAVAILABLE with the reason in the index over gRPC and HTTP, and a load request that
brings a whole config makes it serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support import ServerThread, settings_for


def test_strict_service_serves_whole_configs_and_names_the_rest(tmp_path: Path) -> None:
    from examples.build_repository import build_repository
    from services.onnx.runtime import OnnxRuntime

    build_repository(tmp_path, ["simple", "mlp"])
    whole_mlp = (tmp_path / "mlp" / "config.pbtxt").read_text()
    (tmp_path / "mlp" / "config.pbtxt").unlink()
    settings = settings_for(
        tmp_path, auto_complete_config=False, model_control_mode="explicit", startup_models=("*",)
    )
    with (
        ServerThread(settings, [OnnxRuntime]) as server,
        grpcclient.InferenceServerClient(server.grpc_url) as c,
    ):
        index = {m.name: m for m in c.get_model_repository_index().models}
        assert index["simple"].state == "READY"
        assert index["mlp"].state == "UNAVAILABLE"
        assert "--disable-auto-complete-config" in index["mlp"].reason
        assert "lacks a config.pbtxt" in index["mlp"].reason
        rest = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        try:
            (mlp,) = [m for m in rest.get_model_repository_index() if m["name"] == "mlp"]
            assert "lacks a config.pbtxt" in mlp["reason"]
        finally:
            rest.close()

        x = grpcclient.InferInput("INPUT", [1, 256], "FP32")
        x.set_data_from_numpy(np.zeros((1, 256), np.float32))
        with pytest.raises(InferenceServerException) as info:
            c.infer("mlp", [x])
        assert info.value.status() == "StatusCode.UNAVAILABLE", info.value
        assert "lacks a config.pbtxt" in str(info.value.message())

        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(a)
        assert np.array_equal(c.infer("simple", inputs).as_numpy("OUTPUT0"), a + a)

        # a load request that brings the whole config serves it (the file stays missing)
        from google.protobuf import json_format, text_format

        from protos.gen.inference import model_config_pb2 as mc

        config = text_format.Parse(whole_mlp, mc.ModelConfig())
        c.load_model("mlp", config=json.dumps(json_format.MessageToDict(config)))
        assert c.is_model_ready("mlp")
