"""Frozen TensorFlow graphs (platform tensorflow_graphdef): load, infer, config checks, choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

tf: Any = pytest.importorskip("tensorflow")

from examples.build_tensorflow import build_tensorflow_repository  # noqa: E402
from protos.gen.inference import model_config_pb2 as mc  # noqa: E402
from services.core.errors import ModelLoadError  # noqa: E402
from services.core.runtime import InstanceSpec  # noqa: E402
from services.tensorflow.graphdef import TensorflowGraphdefRuntime  # noqa: E402

CPU = InstanceSpec(name="g_0", kind=mc.ModelInstanceGroup.KIND_CPU)
NAME = "simple_tf_graphdef"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("graphdef_repo")
    build_tensorflow_repository(root, [NAME])
    return root


def config_of(repo: Path) -> mc.ModelConfig:
    return text_format.Parse((repo / NAME / "config.pbtxt").read_text(), mc.ModelConfig())


def model_file(repo: Path) -> Path:
    return repo / NAME / "1" / "model.graphdef"


def test_frozen_graph_runs_with_config_names(repo: Path) -> None:
    runtime = TensorflowGraphdefRuntime(config_of(repo), model_file(repo), CPU)
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.int32)
    out = runtime.infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"])
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    only = runtime.infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT1"])
    assert list(only) == ["OUTPUT1"]
    runtime.unload()


def test_tensor_names_with_an_output_index_work_too(repo: Path) -> None:
    config = config_of(repo)
    config.output[0].name = "OUTPUT0:0"
    runtime = TensorflowGraphdefRuntime(config, model_file(repo), CPU)
    a = np.ones((1, 16), dtype=np.int32)
    assert runtime.infer({"INPUT0": a, "INPUT1": a}, ["OUTPUT0:0"])["OUTPUT0:0"].tolist() == [
        [2] * 16
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.input[0].__setattr__("name", "NOPE"), "input 'NOPE' is not a tensor"),
        (lambda c: c.input[0].__setattr__("name", "OUTPUT0"), "is a Identity, not a Placeholder"),
        (
            lambda c: c.output[1].__setattr__("data_type", mc.TYPE_FP32),
            "output 'OUTPUT1' is TYPE_INT32 in the graph but TYPE_FP32 in the config",
        ),
        (lambda c: c.input[0].dims.append(2), "input 'INPUT0' has rank 2 in the graph"),
        (lambda c: c.ClearField("output"), "must declare its inputs and outputs"),
    ],
)
def test_config_that_does_not_match_the_graph_is_refused(
    repo: Path, change: Any, message: str
) -> None:
    config = config_of(repo)
    change(config)
    with pytest.raises(ModelLoadError, match=message):
        TensorflowGraphdefRuntime(config, model_file(repo), CPU)


def test_a_file_that_is_not_a_graphdef_is_refused(tmp_path: Path, repo: Path) -> None:
    bad = tmp_path / "model.graphdef"
    bad.write_bytes(b"\xff\xfe not a protobuf")
    with pytest.raises(ModelLoadError, match="is not a TensorFlow GraphDef"):
        TensorflowGraphdefRuntime(config_of(repo), bad, CPU)


def test_manager_picks_the_runtime_by_platform_or_by_file(repo: Path) -> None:
    from services.core import repository
    from services.core.model_prep import runtime_for
    from services.tensorflow.runtime import TensorflowRuntime

    runtimes = [TensorflowRuntime, TensorflowGraphdefRuntime]
    model_dir = repository.scan_model(repo / NAME)
    assert runtime_for(runtimes, config_of(repo), model_dir) is TensorflowGraphdefRuntime
    by_backend = mc.ModelConfig(name=NAME, backend="tensorflow")
    assert runtime_for(runtimes, by_backend, model_dir) is TensorflowGraphdefRuntime
    assert runtime_for(runtimes, mc.ModelConfig(name=NAME), model_dir) is TensorflowGraphdefRuntime
    assert runtime_for(runtimes, mc.ModelConfig(platform="onnxruntime_onnx"), model_dir) is None
