"""TorchRuntime against the torch example models: load, infer, IO naming, dtypes, load errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

torch = pytest.importorskip("torch")

from examples.build_torch import (  # noqa: E402
    DTYPES_DATATYPES,
    SEQUENCE_CONFIG,
    SimpleAddSub,
    build_torch_repository,
    cnn_module,
    mlp_module,
)
from protos.gen.inference import model_config_pb2 as mc  # noqa: E402
from services.core.dtypes import BF16_DTYPE  # noqa: E402
from services.core.errors import InternalError, ModelLoadError, Unavailable  # noqa: E402
from services.core.runtime import InstanceSpec  # noqa: E402
from services.core.sequences import runtime_config  # noqa: E402
from services.torch.runtime import TorchRuntime  # noqa: E402
from services.torch.tensors import CONFIG_TO_TORCH, to_numpy, to_torch  # noqa: E402
from tests.datatype_samples import assert_identical, edge_values, kit_form  # noqa: E402

CPU_INSTANCE = InstanceSpec(name="test_0", kind=mc.ModelInstanceGroup.KIND_CPU)
GPU_INSTANCE = InstanceSpec(name="test_0", kind=mc.ModelInstanceGroup.KIND_GPU, device_id=0)
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("torch_repo")
    build_torch_repository(root)
    return root


def read_config(repo: Path, name: str) -> mc.ModelConfig:
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())


def model_file(repo: Path, name: str) -> Path:
    config = read_config(repo, name)
    return repo / name / "1" / (config.default_model_filename or "model.pt")


def load(repo: Path, name: str, config: mc.ModelConfig | None = None) -> TorchRuntime:
    config = config if config is not None else read_config(repo, name)
    return TorchRuntime(config, model_file(repo, name), CPU_INSTANCE)


def config_text(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def save_script(module: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module).save(str(path))
    return path


def test_simple_adds_and_subtracts(repo: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, (3, 16), dtype=np.int32)
    out = load(repo, "simple_torch").infer(
        {"INPUT__0": a, "INPUT__1": b}, ["OUTPUT__0", "OUTPUT__1"]
    )
    np.testing.assert_array_equal(out["OUTPUT__0"], a + b)
    np.testing.assert_array_equal(out["OUTPUT__1"], a - b)
    assert out["OUTPUT__0"].dtype == np.int32


def test_only_requested_outputs_are_returned(repo: Path) -> None:
    a = np.ones((1, 16), dtype=np.int32)
    out = load(repo, "simple_torch").infer({"INPUT__0": a, "INPUT__1": a}, ["OUTPUT__1"])
    assert list(out) == ["OUTPUT__1"]


def test_read_only_inputs_are_accepted(repo: Path) -> None:
    a = np.frombuffer(np.arange(16, dtype=np.int32).tobytes(), dtype=np.int32).reshape(1, 16)
    assert not a.flags.writeable
    out = load(repo, "simple_torch").infer({"INPUT__0": a, "INPUT__1": a}, ["OUTPUT__0"])
    np.testing.assert_array_equal(out["OUTPUT__0"], a * 2)


@pytest.mark.parametrize("name", ["mlp_torch", "mlp_torch_export"])
def test_mlp_matches_the_eager_module(repo: Path, name: str) -> None:
    x = np.random.default_rng(2).standard_normal((5, 256)).astype(np.float32)
    out = load(repo, name).infer({"INPUT__0": x}, ["OUTPUT__0"])["OUTPUT__0"]
    with torch.inference_mode():
        expected = mlp_module()(torch.from_numpy(x)).numpy()
    assert out.shape == (5, 10)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_cnn_matches_the_eager_module(repo: Path) -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = load(repo, "cnn_torch").infer({"INPUT__0": x}, ["OUTPUT__0"])["OUTPUT__0"]
    with torch.inference_mode():
        expected = cnn_module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_export_program_autocompletes_io(repo: Path) -> None:
    config = config_text('name: "auto"\nmax_batch_size: 8')
    TorchRuntime.autocomplete(config, model_file(repo, "mlp_torch_export"))
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", mc.TYPE_FP32, [256])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("OUTPUT__0", mc.TYPE_FP32, [10])
    ]
    runtime = TorchRuntime(config, model_file(repo, "mlp_torch_export"), CPU_INSTANCE)
    x = np.zeros((1, 256), dtype=np.float32)
    assert runtime.infer({"input": x}, ["OUTPUT__0"])["OUTPUT__0"].shape == (1, 10)


def test_torchscript_is_not_autocompleted(repo: Path) -> None:
    config = config_text('name: "auto"')
    TorchRuntime.autocomplete(config, model_file(repo, "mlp_torch"))
    assert not config.input and not config.output


class NamedArgs(torch.nn.Module):
    def forward(self, first: torch.Tensor, second: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": first + second, "scaled": first * 10}


NAMED_CONFIG = """
name: "named"
max_batch_size: 0
input [ { name: "second" data_type: TYPE_FP32 dims: [ 2 ] },
        { name: "first" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "scaled" data_type: TYPE_FP32 dims: [ 2 ] },
         { name: "total" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


def test_inputs_named_after_forward_arguments_and_dict_outputs(tmp_path: Path) -> None:
    path = save_script(NamedArgs(), tmp_path / "1" / "model.pt")
    runtime = TorchRuntime(config_text(NAMED_CONFIG), path, CPU_INSTANCE)
    assert runtime.arguments == ["first", "second"]
    first = np.array([1, 2], dtype=np.float32)
    second = np.array([10, 20], dtype=np.float32)
    out = runtime.infer({"first": first, "second": second}, ["scaled", "total"])
    np.testing.assert_array_equal(out["scaled"], [10, 20])
    np.testing.assert_array_equal(out["total"], [11, 22])


def test_indexed_inputs_map_by_position_not_declaration_order(tmp_path: Path) -> None:
    path = save_script(SimpleAddSub(), tmp_path / "1" / "model.pt")
    config = config_text(
        'name: "swap" input [ { name: "B__1" data_type: TYPE_INT32 dims: [ 2 ] },'
        ' { name: "A__0" data_type: TYPE_INT32 dims: [ 2 ] } ]'
        ' output [ { name: "DIFF__1" data_type: TYPE_INT32 dims: [ 2 ] } ]'
    )
    runtime = TorchRuntime(config, path, CPU_INSTANCE)
    a = np.array([5, 5], dtype=np.int32)
    b = np.array([1, 2], dtype=np.int32)
    out = runtime.infer({"A__0": a, "B__1": b}, ["DIFF__1"])
    np.testing.assert_array_equal(out["DIFF__1"], [4, 3])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["INPUT__0", "other"], "neither an argument of forward()"),
        (["INPUT__0", "INPUT__2"], "argument(s) [1] unset"),
        (["INPUT__0", "a"], "both map to forward() argument 0"),
        (["INPUT__0", "INPUT__1", "INPUT__2"], "takes 2"),
    ],
)
def test_bad_input_names_fail_to_load(tmp_path: Path, inputs: list[str], message: str) -> None:
    path = save_script(SimpleAddSub(), tmp_path / "1" / "model.pt")
    config = mc.ModelConfig(name="bad")
    for name in inputs:
        config.input.add(name=name, data_type=mc.TYPE_INT32, dims=[2])
    config.output.add(name="OUTPUT__0", data_type=mc.TYPE_INT32, dims=[2])
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        TorchRuntime(config, path, CPU_INSTANCE)


def test_sequence_controls_and_state_take_their_argument_positions(repo: Path) -> None:
    config = runtime_config(read_config(repo, "simple_sequence_torch"))
    runtime = load(repo, "simple_sequence_torch", config)
    assert runtime.arguments == ["value", "start", "ready", "acc_in"]

    def run(start: int, ready: int) -> tuple[int, int]:
        feed = {"INPUT__0": 5, "START__1": start, "READY__2": ready, "ACC_IN__3": 7}
        arrays = {name: np.array([[v]], dtype=np.int32) for name, v in feed.items()}
        out = runtime.infer(arrays, ["OUTPUT__0", "ACC_OUT__1"])
        return int(out["OUTPUT__0"][0, 0]), int(out["ACC_OUT__1"][0, 0])

    assert run(start=0, ready=1) == (12, 12)
    assert run(start=1, ready=1) == (5, 5)
    assert run(start=0, ready=0) == (7, 7)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("START__1", "START", "sequence_batching control_input 'START' is neither an argument"),
        ("ACC_IN__3", "ACC_IN__1", "control_input 'START__1' and sequence_batching state"),
        ("ACC_IN__3", "ACC_IN__4", "control inputs and state inputs leave forward() argument"),
    ],
)
def test_misnamed_sequence_inputs_name_their_config_entry(
    repo: Path, old: str, new: str, message: str
) -> None:
    config = runtime_config(config_text(SEQUENCE_CONFIG.replace(old, new)))
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load(repo, "simple_sequence_torch", config)


def test_output_index_beyond_the_result_is_a_clear_error(tmp_path: Path) -> None:
    path = save_script(SimpleAddSub(), tmp_path / "1" / "model.pt")
    config = config_text(
        'name: "m" input [ { name: "INPUT__0" data_type: TYPE_INT32 dims: [ 2 ] },'
        ' { name: "INPUT__1" data_type: TYPE_INT32 dims: [ 2 ] } ]'
        ' output [ { name: "OUTPUT__5" data_type: TYPE_INT32 dims: [ 2 ] } ]'
    )
    runtime = TorchRuntime(config, path, CPU_INSTANCE)
    a = np.zeros(2, dtype=np.int32)
    with pytest.raises(InternalError, match="asks for result 5 but forward\\(\\) returned 2"):
        runtime.infer({"INPUT__0": a, "INPUT__1": a}, ["OUTPUT__5"])


def test_output_dtype_mismatch_names_the_fix(repo: Path) -> None:
    config = read_config(repo, "simple_torch")
    config.output[0].data_type = mc.TYPE_FP32
    runtime = TorchRuntime(config, model_file(repo, "simple_torch"), CPU_INSTANCE)
    a = np.zeros((1, 16), dtype=np.int32)
    with pytest.raises(InternalError, match="declares TYPE_FP32; fix data_type"):
        runtime.infer({"INPUT__0": a, "INPUT__1": a}, ["OUTPUT__0"])


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


@pytest.mark.parametrize("data_type", sorted(CONFIG_TO_TORCH))
def test_every_supported_dtype_round_trips(tmp_path: Path, data_type: int) -> None:
    path = save_script(Identity(), tmp_path / "1" / "model.pt")
    config = mc.ModelConfig(name="identity")
    config.input.add(name="INPUT__0", data_type=data_type, dims=[4])
    config.output.add(name="OUTPUT__0", data_type=data_type, dims=[4])
    runtime = TorchRuntime(config, path, CPU_INSTANCE)
    if data_type == mc.TYPE_BF16:
        # bfloat16 bits of 1.0, -2.0, 0.5, 3.0
        x = np.array([0x3F80, 0xC000, 0x3F00, 0x4040], dtype=np.uint16).view(BF16_DTYPE)
    elif data_type == mc.TYPE_BOOL:
        x = np.array([True, False, True, True])
    else:
        from services.core.dtypes import BY_CONFIG

        x = np.array([1, 0, 3, 7]).astype(BY_CONFIG[data_type].numpy)
    out = runtime.infer({"INPUT__0": x}, ["OUTPUT__0"])["OUTPUT__0"]
    assert out.dtype == x.dtype
    assert out.tobytes() == x.tobytes()


def test_bf16_is_reinterpreted_not_converted() -> None:
    bits = np.array([0x3F80, 0x4049], dtype=np.uint16).view(BF16_DTYPE)
    tensor = to_torch(bits, torch.device("cpu"))
    assert tensor.dtype == torch.bfloat16
    assert tensor.tolist() == [1.0, 3.140625]
    assert to_numpy(tensor).tobytes() == bits.tobytes()


def test_writable_inputs_are_shared_not_copied() -> None:
    x = np.arange(4, dtype=np.float32)
    tensor = to_torch(x, torch.device("cpu"))
    assert tensor.data_ptr() == x.ctypes.data
    assert np.shares_memory(to_numpy(tensor), x)


def test_dtypes_model_round_trips_every_datatype_exactly(repo: Path) -> None:
    sent = {d: kit_form(d, edge_values(d)) for d in DTYPES_DATATYPES}
    out = load(repo, "dtypes_torch").infer({f"IN_{d}": a for d, a in sent.items()}, [])
    assert sorted(out) == sorted(f"OUT_{d}" for d in DTYPES_DATATYPES)
    for datatype, data in sent.items():
        assert_identical(out[f"OUT_{datatype}"], data, datatype)


def test_every_datatype_but_bytes_is_exchanged() -> None:
    assert sorted(mc.DataType.Name(t) for t in CONFIG_TO_TORCH) == sorted(
        f"TYPE_{d}" for d in DTYPES_DATATYPES
    )


@pytest.mark.parametrize("data_type", [mc.TYPE_STRING, mc.TYPE_INVALID])
def test_unsupported_config_types_fail_to_load(repo: Path, data_type: int) -> None:
    config = read_config(repo, "simple_torch")
    config.input[0].data_type = data_type
    with pytest.raises(ModelLoadError, match="input 'INPUT__0' is TYPE_"):
        load(repo, "simple_torch", config)


def test_string_type_message_says_what_to_do(repo: Path) -> None:
    config = read_config(repo, "simple_torch")
    config.output[1].data_type = mc.TYPE_STRING
    with pytest.raises(ModelLoadError, match="no torch tensor type; pre-process strings"):
        load(repo, "simple_torch", config)


def test_gpu_instance_without_cuda_is_refused_clearly(repo: Path) -> None:
    if HAS_CUDA:
        pytest.skip("this torch has CUDA; the refusal path only exists without it")
    with pytest.raises(ModelLoadError, match="KIND_GPU but this torch build has no CUDA device"):
        TorchRuntime(read_config(repo, "mlp_torch"), model_file(repo, "mlp_torch"), GPU_INSTANCE)


@pytest.mark.skipif(not HAS_CUDA, reason="the KIND_GPU path needs a CUDA device and CUDA torch")
@pytest.mark.parametrize("name", ["mlp_torch", "mlp_torch_export"])
def test_gpu_instance_matches_cpu(repo: Path, name: str) -> None:
    config = read_config(repo, name)
    gpu = TorchRuntime(config, model_file(repo, name), GPU_INSTANCE)
    assert gpu.device.type == "cuda"
    x = np.random.default_rng(4).standard_normal((3, 256)).astype(np.float32)
    out = gpu.infer({"INPUT__0": x}, ["OUTPUT__0"])["OUTPUT__0"]
    cpu = load(repo, name).infer({"INPUT__0": x}, ["OUTPUT__0"])["OUTPUT__0"]
    np.testing.assert_allclose(out, cpu, rtol=1e-3, atol=1e-3)


def test_pickled_module_is_refused_naming_the_file(tmp_path: Path, repo: Path) -> None:
    path = tmp_path / "1" / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save(SimpleAddSub(), path)
    with pytest.raises(ModelLoadError, match=r"model\.pt is not a TorchScript archive"):
        TorchRuntime(read_config(repo, "simple_torch"), path, CPU_INSTANCE)


@pytest.mark.parametrize("filename", ["model.pt", "model.pt2"])
def test_garbage_file_is_refused_naming_the_file(tmp_path: Path, repo: Path, filename: str) -> None:
    path = tmp_path / "1" / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"definitely not a model")
    with pytest.raises(ModelLoadError, match=filename.replace(".", r"\.")):
        TorchRuntime(read_config(repo, "simple_torch"), path, CPU_INSTANCE)


def test_missing_file_is_refused(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        TorchRuntime(read_config(repo, "simple_torch"), tmp_path / "model.pt", CPU_INSTANCE)


def test_bad_parameters_fail_to_load(repo: Path) -> None:
    config = read_config(repo, "simple_torch")
    config.parameters["INTRA_OP_THREAD_COUNT"].string_value = "many"
    with pytest.raises(ModelLoadError, match="INTRA_OP_THREAD_COUNT' must be a positive integer"):
        load(repo, "simple_torch", config)
    config = read_config(repo, "simple_torch")
    config.parameters["INFERENCE_MODE"].string_value = "maybe"
    with pytest.raises(ModelLoadError, match="INFERENCE_MODE' must be true/false"):
        load(repo, "simple_torch", config)


def test_no_grad_mode_and_unoptimized_execution_still_infer(repo: Path) -> None:
    config = read_config(repo, "simple_torch")
    config.parameters["INFERENCE_MODE"].string_value = "false"
    config.parameters["DISABLE_OPTIMIZED_EXECUTION"].string_value = "true"
    a = np.ones((1, 16), dtype=np.int32)
    out = load(repo, "simple_torch", config).infer({"INPUT__0": a, "INPUT__1": a}, ["OUTPUT__0"])
    np.testing.assert_array_equal(out["OUTPUT__0"], a * 2)


def test_unloaded_instance_is_unavailable(repo: Path) -> None:
    runtime = load(repo, "simple_torch")
    runtime.unload()
    a = np.ones((1, 16), dtype=np.int32)
    with pytest.raises(Unavailable):
        runtime.infer({"INPUT__0": a, "INPUT__1": a}, ["OUTPUT__0"])
