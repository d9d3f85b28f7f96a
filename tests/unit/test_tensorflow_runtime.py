"""TensorflowRuntime on the SavedModel examples: load, infer, auto-complete, parameters, errors."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

tf: Any = pytest.importorskip("tensorflow")

from examples.build_tensorflow import (  # noqa: E402
    DTYPES_DATATYPES,
    build_tensorflow_repository,
    mlp_reference,
)
from protos.gen.inference import model_config_pb2 as mc  # noqa: E402
from services.core.dtypes import BF16_DTYPE  # noqa: E402
from services.core.errors import ModelLoadError, Unavailable  # noqa: E402
from services.core.runtime import InstanceSpec  # noqa: E402
from services.tensorflow.runtime import TensorflowRuntime  # noqa: E402
from services.tensorflow.signature import to_numpy, to_tf  # noqa: E402
from tests.datatype_samples import ALL_DATATYPES, assert_identical, edge_values, kit_form  # noqa: E402

CPU_INSTANCE = InstanceSpec(name="test_0", kind=mc.ModelInstanceGroup.KIND_CPU)
GPU_INSTANCE = InstanceSpec(name="test_0", kind=mc.ModelInstanceGroup.KIND_GPU, device_id=0)


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tensorflow_repo")
    build_tensorflow_repository(root)
    return root


def read_config(repo: Path, name: str) -> mc.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())


def model_dir(repo: Path, name: str) -> Path:
    return repo / name / "1" / "model.savedmodel"


def load(repo: Path, name: str, config: mc.ModelConfig | None = None) -> TensorflowRuntime:
    config = config if config is not None else read_config(repo, name)
    return TensorflowRuntime(config, model_dir(repo, name), CPU_INSTANCE)


def with_param(config: mc.ModelConfig, key: str, value: str) -> mc.ModelConfig:
    config.parameters[key].string_value = value
    return config


def int_pair(rows: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, (rows, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, (rows, 16), dtype=np.int32)
    return a, b


def test_simple_adds_and_subtracts(repo: Path) -> None:
    a, b = int_pair()
    out = load(repo, "simple_tf").infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"])
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    assert out["OUTPUT0"].dtype == np.int32


def test_only_requested_outputs_are_returned(repo: Path) -> None:
    a, b = int_pair(1)
    out = load(repo, "simple_tf").infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT1"])
    assert list(out) == ["OUTPUT1"]


def test_mlp_matches_the_tensorflow_function_and_numpy(repo: Path) -> None:
    x = np.random.default_rng(2).standard_normal((5, 256)).astype(np.float32)
    out = np.asarray(load(repo, "mlp_tf").infer({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], np.float32)
    direct = tf.saved_model.load(str(model_dir(repo, "mlp_tf"))).signatures["serving_default"]
    expected = direct(INPUT0=tf.constant(x))["OUTPUT0"].numpy()
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out, mlp_reference(x), atol=1e-4)
    assert out.shape == (5, 10)


def test_signature_parameter_selects_the_signature(repo: Path) -> None:
    a, b = int_pair()
    config = with_param(read_config(repo, "simple_tf"), "TF_SIGNATURE_DEF", "swapped")
    out = load(repo, "simple_tf", config).infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT1"])
    np.testing.assert_array_equal(out["OUTPUT1"], b - a)


def test_unknown_signature_lists_the_ones_there(repo: Path) -> None:
    config = with_param(read_config(repo, "simple_tf"), "TF_SIGNATURE_DEF", "nope")
    with pytest.raises(ModelLoadError, match=r"no signature 'nope'.*serving_default.*swapped"):
        load(repo, "simple_tf", config)


def test_unknown_graph_tag_is_a_load_error(repo: Path) -> None:
    config = with_param(read_config(repo, "simple_tf"), "TF_GRAPH_TAG", "train")
    with pytest.raises(ModelLoadError, match="TF_GRAPH_TAG"):
        load(repo, "simple_tf", config)


def test_autocomplete_from_an_empty_config(repo: Path) -> None:
    config = mc.ModelConfig(name="simple_tf_auto")
    TensorflowRuntime.autocomplete(config, model_dir(repo, "simple_tf_auto"))
    assert config.platform == "tensorflow_savedmodel"
    assert config.backend == "tensorflow"
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    assert [(io.name, io.data_type, list(io.dims)) for io in config.input] == [
        ("INPUT0", mc.TYPE_INT32, [16]),
        ("INPUT1", mc.TYPE_INT32, [16]),
    ]
    assert [io.name for io in config.output] == ["OUTPUT0", "OUTPUT1"]
    a, b = int_pair()
    out = TensorflowRuntime(config, model_dir(repo, "simple_tf_auto"), CPU_INSTANCE).infer(
        {"INPUT0": a, "INPUT1": b}, []
    )
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)


def test_autocomplete_keeps_what_the_user_wrote(repo: Path) -> None:
    config = text_format.Parse(
        'name: "partial" max_batch_size: 16 sequence_batching {} output { name: "OUTPUT1" }',
        mc.ModelConfig(),
    )
    TensorflowRuntime.autocomplete(config, model_dir(repo, "simple_tf_auto"))
    assert config.max_batch_size == 16
    assert not config.HasField("dynamic_batching")
    assert [(io.name, list(io.dims)) for io in config.output] == [("OUTPUT1", [16])]
    assert [(io.name, list(io.dims)) for io in config.input] == [("INPUT0", [16]), ("INPUT1", [16])]


def test_autocomplete_without_batching_keeps_full_dims(repo: Path) -> None:
    config = text_format.Parse(
        'name: "nobatch" input { name: "INPUT0" dims: [ -1, 256 ] }', mc.ModelConfig()
    )
    TensorflowRuntime.autocomplete(config, model_dir(repo, "mlp_tf"))
    assert config.max_batch_size == 0
    assert [(io.name, list(io.dims)) for io in config.output] == [("OUTPUT0", [-1, 10])]
    x = np.ones((2, 256), np.float32)
    out = TensorflowRuntime(config, model_dir(repo, "mlp_tf"), CPU_INSTANCE).infer(
        {"INPUT0": x}, ["OUTPUT0"]
    )
    assert out["OUTPUT0"].shape == (2, 10)


def test_config_that_disagrees_with_the_signature_says_what_to_write(repo: Path) -> None:
    config = read_config(repo, "simple_tf")
    config.input[0].data_type = mc.TYPE_FP32
    with pytest.raises(ModelLoadError, match="write data_type: TYPE_INT32"):
        load(repo, "simple_tf", config)
    config = read_config(repo, "simple_tf")
    del config.input[1]
    with pytest.raises(ModelLoadError, match=r"needs inputs \['INPUT1'\]"):
        load(repo, "simple_tf", config)


def test_kind_gpu_on_tensorflow_cpu_is_a_load_error(repo: Path) -> None:
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this TensorFlow sees a GPU")
    with pytest.raises(ModelLoadError, match=r"KIND_GPU.*KIND_CPU"):
        TensorflowRuntime(
            read_config(repo, "simple_tf"), model_dir(repo, "simple_tf"), GPU_INSTANCE
        )


def test_invalid_directory_is_a_load_error_naming_it(repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.savedmodel"
    bad.mkdir()
    (bad / "junk.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"model\.savedmodel is not a SavedModel directory"):
        TensorflowRuntime(read_config(repo, "simple_tf"), bad, CPU_INSTANCE)
    corrupt = tmp_path / "corrupt" / "model.savedmodel"
    shutil.copytree(model_dir(repo, "simple_tf"), corrupt)
    (corrupt / "saved_model.pb").write_bytes(b"\xff\x00 definitely not a protobuf")
    with pytest.raises(ModelLoadError, match=r"saved_model\.pb"):
        TensorflowRuntime(read_config(repo, "simple_tf"), corrupt, CPU_INSTANCE)


def test_thread_parameters_are_checked_and_late_changes_warn(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = with_param(read_config(repo, "simple_tf"), "TF_NUM_INTRA_THREADS", "many")
    with pytest.raises(ModelLoadError, match=r"TF_NUM_INTRA_THREADS.*non-negative integer"):
        load(repo, "simple_tf", config)
    # TensorFlow has run already in this process (the examples were built), so its pools are
    # fixed: a different size is reported and the model still loads.
    current = tf.config.threading.get_inter_op_parallelism_threads()
    config = with_param(read_config(repo, "simple_tf"), "TF_NUM_INTER_THREADS", str(current + 3))
    with caplog.at_level(logging.WARNING, logger="services.tensorflow.options"):
        runtime = load(repo, "simple_tf", config)
    assert "TF_NUM_INTER_THREADS" in caplog.text
    a, b = int_pair(1)
    assert runtime.infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT0"])["OUTPUT0"].shape == (1, 16)


def test_unloaded_instance_is_unavailable(repo: Path) -> None:
    runtime = load(repo, "simple_tf")
    runtime.unload()
    a, b = int_pair(1)
    with pytest.raises(Unavailable):
        runtime.infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT0"])


def test_bytes_tensors_round_trip(tmp_path: Path) -> None:
    class Echo(tf.Module):  # type: ignore[misc]  # tf is Any here
        spec = tf.TensorSpec([None], tf.string)

        @tf.function(input_signature=[spec])  # type: ignore[untyped-decorator]
        def serve(self, TEXT: Any) -> dict[str, Any]:  # noqa: N803
            return {"UPPER": tf.strings.upper(TEXT), "LENGTH": tf.strings.length(TEXT)}

    path = tmp_path / "echo" / "1" / "model.savedmodel"
    module = Echo()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    config = mc.ModelConfig(name="echo")
    TensorflowRuntime.autocomplete(config, path)
    assert [(io.name, io.data_type) for io in config.input] == [("TEXT", mc.TYPE_STRING)]
    text = np.array([b"ab", b"\xffz"], dtype=object)
    out = TensorflowRuntime(config, path, CPU_INSTANCE).infer({"TEXT": text}, [])
    assert out["UPPER"].dtype == object
    assert list(out["UPPER"]) == [b"AB", b"\xffZ"]
    assert list(out["LENGTH"]) == [2, 2]


def test_dtypes_model_round_trips_every_datatype_exactly(repo: Path) -> None:
    assert DTYPES_DATATYPES == ALL_DATATYPES
    sent = {d: kit_form(d, edge_values(d)) for d in DTYPES_DATATYPES}
    out = load(repo, "dtypes_tf").infer({f"IN_{d}": a for d, a in sent.items()}, [])
    assert sorted(out) == sorted(f"OUT_{d}" for d in DTYPES_DATATYPES)
    for datatype, data in sent.items():
        assert_identical(out[f"OUT_{datatype}"], data, datatype)


def test_bf16_is_reinterpreted_not_converted() -> None:
    bits = np.array([0x3F80, 0x4049, 0x7FC1], dtype=np.uint16).view(BF16_DTYPE)
    tensor = to_tf(bits, tf.bfloat16)
    assert tensor.dtype == tf.bfloat16
    assert tensor.numpy()[:2].astype(np.float32).tolist() == [1.0, 3.140625]
    assert to_numpy(tensor).dtype == BF16_DTYPE
    assert to_numpy(tensor).tobytes() == bits.tobytes()
    assert to_numpy(tensor[0]).shape == ()


def test_autocomplete_maps_every_datatype(repo: Path) -> None:
    config = mc.ModelConfig(name="dtypes_tf")
    TensorflowRuntime.autocomplete(config, model_dir(repo, "dtypes_tf"))
    declared = {io.name: io.data_type for io in config.input}
    assert declared == {f"IN_{d}": config_type(d) for d in DTYPES_DATATYPES}


def config_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")
