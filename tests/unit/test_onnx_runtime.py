"""OnnxRuntime against the example repository: load, infer, auto-complete, load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper

from examples.build_repository import DTYPES_DATATYPES, build_repository
from examples.onnx_graph import IR_VERSION, OPSET
from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import InvalidArgument, ModelLoadError, Unavailable
from services.core.runtime import InstanceSpec
from services.onnx.runtime import OnnxRuntime
from services.onnx.session_options import plan_session
from tests.datatype_samples import assert_identical, edge_values

CPU_INSTANCE = InstanceSpec(name="test_0", kind=mc.ModelInstanceGroup.KIND_CPU)
GPU_INSTANCE = InstanceSpec(name="test_0", kind=mc.ModelInstanceGroup.KIND_GPU, device_id=0)
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    build_repository(root)
    return root


def read_config(repo: Path, name: str) -> mc.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())


def model_file(repo: Path, name: str) -> Path:
    return repo / name / "1" / "model.onnx"


def load(repo: Path, name: str, config: mc.ModelConfig | None = None) -> OnnxRuntime:
    config = config if config is not None else read_config(repo, name)
    return OnnxRuntime(config, model_file(repo, name), CPU_INSTANCE)


def as_bytes(values: npt.NDArray[np.int32]) -> npt.NDArray[np.object_]:
    return np.array([str(v).encode() for v in values.flat], dtype=object).reshape(values.shape)


def test_simple_adds_and_subtracts(repo: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    out = load(repo, "simple").infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"])
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    assert out["OUTPUT0"].dtype == np.int32


def test_simple_returns_only_requested_outputs(repo: Path) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    out = load(repo, "simple").infer({"INPUT0": a, "INPUT1": a}, ["OUTPUT1"])
    assert list(out) == ["OUTPUT1"]
    np.testing.assert_array_equal(out["OUTPUT1"], np.zeros((1, 16), dtype=np.int32))


def test_simple_string_works_on_decimal_strings(repo: Path) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 7, dtype=np.int32)
    out = load(repo, "simple_string").infer(
        {"INPUT0": as_bytes(a), "INPUT1": as_bytes(b)}, ["OUTPUT0", "OUTPUT1"]
    )
    assert out["OUTPUT0"].dtype == object
    assert out["OUTPUT0"].shape == (2, 16)
    assert isinstance(out["OUTPUT0"][0, 0], bytes)
    np.testing.assert_array_equal(out["OUTPUT0"], as_bytes(a + b))
    np.testing.assert_array_equal(out["OUTPUT1"], as_bytes(a - b))


def test_simple_identity_round_trips_utf8_bytes(repo: Path) -> None:
    data = np.array([[b"hello", "h\u00e9llo".encode(), b""]] * 2, dtype=object)
    out = load(repo, "simple_identity").infer({"INPUT0": data}, ["OUTPUT0"])
    assert out["OUTPUT0"].shape == (2, 3)
    assert out["OUTPUT0"].tolist() == data.tolist()


def test_non_utf8_bytes_are_a_caller_error(repo: Path) -> None:
    data = np.array([[b"\xff\xfe"]], dtype=object)
    with pytest.raises(InvalidArgument, match=r"INPUT0.*not valid UTF-8"):
        load(repo, "simple_identity").infer({"INPUT0": data}, ["OUTPUT0"])


@pytest.mark.parametrize(("name", "shape"), [("mlp", (256,)), ("cnn", (3, 64, 64))])
def test_dense_models_are_deterministic_across_builds(
    repo: Path, tmp_path: Path, name: str, shape: tuple[int, ...]
) -> None:
    build_repository(tmp_path, [name])
    assert model_file(tmp_path, name).read_bytes() == model_file(repo, name).read_bytes()
    x = np.random.default_rng(2).standard_normal((5, *shape)).astype(np.float32)
    first = load(repo, name).infer({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"]
    second = load(tmp_path, name).infer({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"]
    assert first.shape == (5, 10)
    assert first.dtype == np.float32
    assert np.all(np.isfinite(first))
    np.testing.assert_array_equal(first, second)


def test_cnn_has_labels(repo: Path) -> None:
    config = read_config(repo, "cnn")
    assert config.output[0].label_filename == "labels.txt"
    labels = (repo / "cnn" / "labels.txt").read_text().splitlines()
    assert len(labels) == 10
    assert config.max_batch_size == 64
    assert config.HasField("dynamic_batching")


def test_rebuild_leaves_unchanged_files_alone(repo: Path, tmp_path: Path) -> None:
    build_repository(tmp_path, ["simple"])
    target = model_file(tmp_path, "simple")
    before = target.stat().st_mtime_ns
    build_repository(tmp_path, ["simple"])
    assert target.stat().st_mtime_ns == before
    (tmp_path / "simple" / "config.pbtxt").write_text("garbage")
    build_repository(tmp_path, ["simple"])
    assert read_config(tmp_path, "simple").max_batch_size == 8


def test_unknown_example_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown example model"):
        build_repository(tmp_path, ["resnet50"])


def test_autocomplete_from_empty_config(repo: Path) -> None:
    config = mc.ModelConfig(name="simple")
    OnnxRuntime.autocomplete(config, model_file(repo, "simple"))
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("INPUT0", mc.TYPE_INT32, [16]),
        ("INPUT1", mc.TYPE_INT32, [16]),
    ]
    assert [o.name for o in config.output] == ["OUTPUT0", "OUTPUT1"]
    load(repo, "simple", config)  # the completed config is accepted by the runtime


def test_autocomplete_keeps_what_the_user_wrote(repo: Path) -> None:
    config = text_format.Parse(
        'name: "cnn" backend: "onnxruntime" max_batch_size: 16 '
        'input { name: "INPUT0" } '
        'output { name: "OUTPUT0" label_filename: "labels.txt" } '
        "sequence_batching { }",
        mc.ModelConfig(),
    )
    OnnxRuntime.autocomplete(config, model_file(repo, "cnn"))
    assert config.platform == ""
    assert config.max_batch_size == 16
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    assert list(config.input[0].dims) == [3, 64, 64]
    assert config.input[0].data_type == mc.TYPE_FP32
    assert len(config.output) == 1
    assert list(config.output[0].dims) == [10]
    assert config.output[0].label_filename == "labels.txt"


def test_autocomplete_full_dims_mean_no_batching(repo: Path) -> None:
    config = text_format.Parse(
        'name: "simple" input { name: "INPUT0" dims: [ -1, 16 ] }', mc.ModelConfig()
    )
    OnnxRuntime.autocomplete(config, model_file(repo, "simple"))
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert [list(i.dims) for i in config.input] == [[-1, 16], [-1, 16]]


def test_autocomplete_fixed_batch_dimension_means_no_batching(tmp_path: Path) -> None:
    shape = [1, 4]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    path = tmp_path / "model.onnx"
    onnx.save(
        helper.make_model(
            graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
        ),
        path,
    )
    config = mc.ModelConfig(name="fixed")
    OnnxRuntime.autocomplete(config, path)
    assert config.max_batch_size == 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [1, 4])]
    x = np.array([[-1, 2, -3, 4]], dtype=np.float32)
    out = OnnxRuntime(config, path, CPU_INSTANCE).infer({"x": x}, ["y"])
    np.testing.assert_array_equal(out["y"], np.maximum(x, 0))


def test_invalid_model_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match=r"model 'broken'.*model\.onnx"):
        OnnxRuntime(mc.ModelConfig(name="broken"), path, CPU_INSTANCE)
    with pytest.raises(ModelLoadError, match=r"model 'broken'.*model\.onnx"):
        OnnxRuntime.autocomplete(mc.ModelConfig(name="broken"), path)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime build has CUDA")
def test_gpu_instance_on_cpu_build_says_what_to_do(repo: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        OnnxRuntime(read_config(repo, "simple"), model_file(repo, "simple"), GPU_INSTANCE)
    message = caught.value.message
    assert "model 'simple' asks for the CUDA execution provider" in message
    assert "CPUExecutionProvider" in message
    assert "install onnxruntime-gpu or use KIND_CPU" in message


def test_unavailable_accelerators_are_load_errors(repo: Path) -> None:
    config = read_config(repo, "simple")
    accel = config.optimization.execution_accelerators.cpu_execution_accelerator.add()
    accel.name = "openvino"
    with pytest.raises(ModelLoadError, match="OpenVINO execution provider"):
        load(repo, "simple", config)
    accel.name = "tvm"
    with pytest.raises(ModelLoadError, match="unknown cpu_execution_accelerator 'tvm'"):
        load(repo, "simple", config)


def test_gpu_accelerators_are_ignored_on_cpu_instances(repo: Path) -> None:
    config = read_config(repo, "simple")
    trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
    trt.name = "tensorrt"
    trt.parameters["precision_mode"] = "FP16"
    assert load(repo, "simple", config).session.get_providers() == ["CPUExecutionProvider"]


def test_session_options_follow_config_parameters(repo: Path) -> None:
    config = read_config(repo, "mlp")
    for key, value in {
        "intra_op_thread_count": "3",  # the example's own is 1
        "inter_op_thread_count": "2",
        "execution_mode": "1",
        "enable_mem_pattern": "0",
        "session.intra_op.allow_spinning": "0",
    }.items():
        config.parameters[key].string_value = value
    config.optimization.graph.level = -1
    options = load(repo, "mlp", config).session.get_session_options()
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 2  # ORT runs parallel mode only with > 1
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.enable_mem_pattern is False
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def test_bad_parameter_value_is_a_load_error(repo: Path) -> None:
    config = read_config(repo, "mlp")
    config.parameters["intra_op_thread_count"].string_value = "two"
    with pytest.raises(ModelLoadError, match="'intra_op_thread_count' must be an integer"):
        load(repo, "mlp", config)


def test_config_that_disagrees_with_the_model_is_a_load_error(repo: Path) -> None:
    config = read_config(repo, "simple")
    config.input[0].data_type = mc.TYPE_FP32
    with pytest.raises(ModelLoadError, match="write data_type: TYPE_INT32"):
        load(repo, "simple", config)
    config = read_config(repo, "simple")
    config.input[0].dims[:] = [8]
    with pytest.raises(ModelLoadError, match=r"write dims: \[16\]"):
        load(repo, "simple", config)
    config = read_config(repo, "simple")
    del config.input[1]
    with pytest.raises(ModelLoadError, match=r"needs inputs \['INPUT1'\]"):
        load(repo, "simple", config)
    config = read_config(repo, "simple")
    config.output[0].name = "SUM"
    with pytest.raises(ModelLoadError, match="config output 'SUM' is not an output"):
        load(repo, "simple", config)


def test_unloaded_instance_refuses_work(repo: Path) -> None:
    runtime = load(repo, "simple")
    runtime.unload()
    a = np.ones((1, 16), dtype=np.int32)
    with pytest.raises(Unavailable, match="unloaded"):
        runtime.infer({"INPUT0": a, "INPUT1": a}, ["OUTPUT0"])


GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_gpu_plan_maps_tensorrt_and_cuda_settings(repo: Path) -> None:
    config = read_config(repo, "cnn")
    trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
    trt.name = "tensorrt"
    trt.parameters["precision_mode"] = "FP16"
    trt.parameters["max_workspace_size_bytes"] = "1073741824"
    trt.parameters["trt_engine_cache_enable"] = "1"
    config.parameters["cudnn_conv_algo_search"].string_value = "1"
    instance = InstanceSpec(name="cnn_0", kind=mc.ModelInstanceGroup.KIND_GPU, device_id=3)
    plan = plan_session(config, instance, available=GPU_BUILD)
    assert plan.providers == GPU_BUILD
    assert plan.provider_options[0] == {
        "device_id": "3",
        "trt_fp16_enable": "True",
        "trt_max_workspace_size": "1073741824",
        "trt_engine_cache_enable": "True",
    }
    assert plan.provider_options[1] == {"device_id": "3", "cudnn_conv_algo_search": "HEURISTIC"}


def test_auto_kind_follows_the_build(repo: Path) -> None:
    config = read_config(repo, "simple")
    auto = InstanceSpec(name="simple_0", kind=mc.ModelInstanceGroup.KIND_AUTO)
    assert plan_session(config, auto, available=GPU_BUILD).providers[0] == "CUDAExecutionProvider"
    cpu_only = ["CPUExecutionProvider"]
    assert plan_session(config, auto, available=cpu_only).providers == cpu_only


def test_tensorrt_without_tensorrt_build_says_so(repo: Path) -> None:
    config = read_config(repo, "simple")
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add()
    accel.name = "tensorrt"
    with pytest.raises(ModelLoadError, match="asks for the TensorRT execution provider"):
        plan_session(config, GPU_INSTANCE, available=GPU_BUILD[1:])
    accel.parameters["precision_mode"] = "FP64"
    with pytest.raises(ModelLoadError, match="precision_mode must be FP32, FP16 or INT8"):
        plan_session(config, GPU_INSTANCE, available=GPU_BUILD)


def test_dtypes_model_round_trips_every_datatype_exactly(repo: Path) -> None:
    sent = {d: edge_values(d, utf8_only=True) for d in DTYPES_DATATYPES}
    out = load(repo, "dtypes_onnx").infer({f"IN_{d}": a for d, a in sent.items()}, [])
    assert sorted(out) == sorted(f"OUT_{d}" for d in DTYPES_DATATYPES)
    for datatype, data in sent.items():
        assert_identical(out[f"OUT_{datatype}"], data, datatype)


def test_bfloat16_model_io_is_refused_at_load(tmp_path: Path) -> None:
    shape: list[int | str] = ["batch", 4]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, shape)],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, shape)],
    )
    path = tmp_path / "model.onnx"
    model = helper.make_model(
        graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )
    onnx.save(model, path)
    config = text_format.Parse(
        'name: "bf16" max_batch_size: 8 '
        'input { name: "x" data_type: TYPE_BF16 dims: [ 4 ] } '
        'output { name: "y" data_type: TYPE_BF16 dims: [ 4 ] }',
        mc.ModelConfig(),
    )
    with pytest.raises(ModelLoadError, match=r"input 'x' is bfloat16.*float16 or float32"):
        OnnxRuntime(config, path, CPU_INSTANCE)
