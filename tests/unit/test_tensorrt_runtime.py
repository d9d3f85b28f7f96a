"""TensorRT family: everything around the engine, tested with FAKE engine objects.

TensorRT cannot be installed in this workplace (its wheels are far too large for the lent GPU
machines, and this machine has no GPU), so the engine, its execution context and device memory
are fakes implementing the Protocols of services/tensorrt/engine.py and device.py: FakeEngine,
FakeContext and HostMemory (device buffers kept in host memory; tests/tensorrt_fakes.py). They exercise dtype mapping,
IO reading, profile selection from ``instance_group.profile``, shape-range checks, config
auto-complete and checks, the TensorRT call order in ``infer``, the load error and the
``__main__`` refusal without TensorRT. The real engine path is one test, skipped here.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import InvalidArgument, ModelLoadError
from services.core.model_prep import instance_specs
from services.core.runtime import InstanceSpec
from services.tensorrt.autocomplete import check_config, complete_config
from services.tensorrt.device import NEEDS_MESSAGE, service_problem
from services.tensorrt.engine import (
    CONFIG_TO_TRT,
    TRT_TO_CONFIG,
    ProfileRange,
    config_type,
    read_io,
)
from services.tensorrt.profiles import check_shape, choose_profile, instance_profiles
from services.tensorrt.runtime import TensorrtRuntime
from tests.tensorrt_fakes import (
    FakeContext,
    HostMemory,
    dynamic_engine,
    static_engine,
)

ROOT = Path(__file__).resolve().parents[2]
GPU = mc.ModelInstanceGroup.KIND_GPU


def config_text(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def instance(index: int = 0, config: mc.ModelConfig | None = None) -> InstanceSpec:
    """Instance ``index`` of ``config`` as the service expands it (no config: a GPU instance)."""
    if config is not None:
        return instance_specs(config)[index]
    return InstanceSpec(name=f"trt_{index}", kind=GPU, device_id=0, index=index)


def test_dtype_tables_map_every_supported_type_both_ways() -> None:
    assert TRT_TO_CONFIG["FLOAT"] == mc.TYPE_FP32
    assert TRT_TO_CONFIG["HALF"] == mc.TYPE_FP16
    assert TRT_TO_CONFIG["BF16"] == mc.TYPE_BF16
    assert TRT_TO_CONFIG["BOOL"] == mc.TYPE_BOOL
    assert TRT_TO_CONFIG["INT64"] == mc.TYPE_INT64
    assert all(TRT_TO_CONFIG[CONFIG_TO_TRT[c]] == c for c in CONFIG_TO_TRT)
    assert mc.TYPE_STRING not in CONFIG_TO_TRT
    with pytest.raises(ModelLoadError, match=r"output 'logits' of the engine is FP8"):
        config_type("m", "output", "logits", "FP8")


def test_read_io_describes_tensors_and_profiles() -> None:
    io = read_io("m", dynamic_engine())
    assert [t.name for t in io.inputs] == ["INPUT"]
    assert [t.name for t in io.outputs] == ["OUTPUT"]
    assert io.num_profiles == 2
    assert io.inputs[0].profiles[1] == ProfileRange((9, 4), (16, 4), (32, 4))
    assert io.inputs[0].batchable
    engine = static_engine()  # a static input: no profile query
    io = read_io("m", engine)
    assert engine.profile_calls == []
    assert io.inputs[0].profiles == (ProfileRange((2, 3), (2, 3), (2, 3)),)
    assert io.outputs[0].data_type == mc.TYPE_FP16


def test_instance_profiles_follow_each_group_default_zero() -> None:
    plain = config_text('name: "m" instance_group { kind: KIND_GPU count: 2 }')
    assert instance_profiles(plain, instance(1, plain), 2) == (0,)
    config = config_text(
        'name: "m" instance_group { name: "a" kind: KIND_GPU count: 2 profile: "0" }'
        ' instance_group { name: "b" kind: KIND_GPU profile: ["1", "0"] }'
    )
    assert instance_profiles(config, instance(1, config), 2) == (0,)
    assert instance_profiles(config, instance(2, config), 2) == (1, 0)


@pytest.mark.parametrize("bad", ["2", "-1", "one"])
def test_instance_profile_out_of_range_is_a_load_error(bad: str) -> None:
    config = config_text(
        f'name: "m" instance_group {{ name: "g" kind: KIND_GPU profile: "{bad}" }}'
    )
    with pytest.raises(ModelLoadError) as err:
        instance_profiles(config, instance(0, config), 2)
    assert f"instance group 'g' lists profile '{bad}'" in err.value.message
    assert "between 0 and 1" in err.value.message


def test_check_shape_names_tensor_and_range() -> None:
    allowed = ProfileRange((1, 4), (4, 4), (8, 4))
    check_shape("INPUT", (8, 4), allowed, 0)
    with pytest.raises(InvalidArgument) as err:
        check_shape("INPUT", (9, 4), allowed, 0)
    assert err.value.message == (
        "input 'INPUT' has shape [9, 4] but optimization profile 0 of the engine accepts shapes "
        "from [1, 4] to [8, 4]; send a shape within that range"
    )
    with pytest.raises(InvalidArgument, match=r"shape \[4\]"):
        check_shape("INPUT", (4,), allowed, 0)


def test_choose_profile_takes_first_that_fits() -> None:
    io = read_io("m", dynamic_engine())
    assert choose_profile(io, (0, 1), {"INPUT": (3, 4)}) == 0
    assert choose_profile(io, (0, 1), {"INPUT": (16, 4)}) == 1
    assert choose_profile(io, (1, 0), {"INPUT": (3, 4)}) == 0
    with pytest.raises(InvalidArgument, match=r"profile 0 .* from \[1, 4\] to \[8, 4\]"):
        choose_profile(io, (0,), {"INPUT": (16, 4)})
    with pytest.raises(InvalidArgument) as err:
        choose_profile(io, (0, 1), {"INPUT": (40, 4)})
    assert "no optimization profile" in err.value.message and "[32, 4]" in err.value.message


def test_complete_config_fills_io_and_batch_from_profile() -> None:
    config = config_text('name: "m"')
    complete_config(config, read_io("m", dynamic_engine()))
    assert (config.platform, config.backend) == ("tensorrt_plan", "tensorrt")
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    inputs = [(io.name, io.data_type, list(io.dims)) for io in config.input]
    assert inputs == [("INPUT", mc.TYPE_FP32, [4])]
    assert [(io.name, list(io.dims)) for io in config.output] == [("OUTPUT", [4])]
    check_config(config, read_io("m", dynamic_engine()))


def test_complete_config_keeps_user_batch_and_static_shapes() -> None:
    config = config_text('name: "m" max_batch_size: 2')
    complete_config(config, read_io("m", dynamic_engine()))
    assert config.max_batch_size == 2
    static = config_text('name: "s"')
    complete_config(static, read_io("s", static_engine()))
    assert static.max_batch_size == 0
    assert [list(io.dims) for io in static.input] == [[2, 3]]
    assert static.output[0].data_type == mc.TYPE_FP16


def test_complete_config_profile_batch_of_one_adds_no_batcher() -> None:
    engine = dynamic_engine()
    engine.tensors["INPUT"].profiles = [((1, 4), (1, 4), (1, 4))]
    config = config_text('name: "m"')
    complete_config(config, read_io("m", engine))
    assert config.max_batch_size == 1
    assert not config.HasField("dynamic_batching")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('input { name: "INPUT" data_type: TYPE_FP16 dims: [4] }', "data_type: TYPE_FP32"),
        ('input { name: "IN" data_type: TYPE_FP32 dims: [4] }', "is not an input of the engine"),
        ('input { name: "INPUT" data_type: TYPE_FP32 dims: [5] }', "write dims: [4]"),
        ("", "needs input(s) ['INPUT']"),
    ],
)
def test_check_config_says_what_to_fix(text: str, message: str) -> None:
    config = config_text(f'name: "m" max_batch_size: 8 {text}')
    with pytest.raises(ModelLoadError) as err:
        check_config(config, read_io("m", dynamic_engine()))
    assert message in err.value.message


def served(profiles: str = "") -> tuple[TensorrtRuntime, FakeContext, HostMemory]:
    memory = HostMemory()
    engine = dynamic_engine(memory)
    config = config_text(f'name: "m" instance_group {{ kind: KIND_GPU {profiles} }}')
    complete_config(config, read_io("m", engine))
    runtime = TensorrtRuntime.from_engine(config, engine, instance(0, config), memory)
    assert len(engine.contexts) == 1  # one execution context per instance
    return runtime, engine.contexts[0], memory


def test_infer_runs_the_tensorrt_call_sequence() -> None:
    runtime, context, memory = served()
    batch = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = runtime.infer({"INPUT": batch}, ["OUTPUT"])
    np.testing.assert_array_equal(out["OUTPUT"], batch * 2)
    assert out["OUTPUT"].dtype == np.float32
    assert context.calls == [
        ("profile", 0, 7),
        ("shape", "INPUT", (3, 4)),
        ("address", "INPUT"),
        ("address", "OUTPUT"),
        ("execute", 7),
    ]
    assert memory.synchronized >= 2


def test_infer_switches_to_the_profile_that_fits() -> None:
    runtime, context, _ = served('profile: ["0", "1"]')
    batch = np.ones((16, 4), dtype=np.float32)
    out = runtime.infer({"INPUT": batch}, [])
    np.testing.assert_array_equal(out["OUTPUT"], batch * 2)
    assert runtime.active_profile == 1
    assert ("profile", 1, 7) in context.calls


def test_infer_refuses_shapes_outside_the_instance_profiles() -> None:
    runtime, context, _ = served('profile: "0"')
    with pytest.raises(InvalidArgument, match=r"input 'INPUT' has shape \[16, 4\]"):
        runtime.infer({"INPUT": np.ones((16, 4), dtype=np.float32)}, ["OUTPUT"])
    assert not any(call[0] == "execute" for call in context.calls)


def test_service_problem_names_what_is_missing() -> None:
    def no_trt() -> Any:
        raise ImportError("No module named 'tensorrt'")

    assert NEEDS_MESSAGE in (service_problem(no_trt, lambda: 1) or "")
    no_gpu = service_problem(lambda: object(), lambda: 0)
    assert no_gpu is not None and "no CUDA GPU" in no_gpu
    assert service_problem(lambda: object(), lambda: 1) is None


@pytest.mark.skipif(service_problem() is None, reason="TensorRT and a GPU are present")
def test_load_without_tensorrt_is_a_clear_load_error(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not an engine")
    config = config_text('name: "m" max_batch_size: 8')
    with pytest.raises(ModelLoadError) as err:
        TensorrtRuntime(config, plan, instance(0))
    assert NEEDS_MESSAGE in err.value.message
    with pytest.raises(ModelLoadError, match="pip install"):
        TensorrtRuntime.autocomplete(config, plan)


@pytest.mark.skipif(service_problem() is None, reason="TensorRT and a GPU are present")
def test_main_refuses_to_start_without_tensorrt(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "services.tensorrt", "--model-repository", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert NEEDS_MESSAGE in done.stderr


@pytest.mark.skip(reason="needs TensorRT and a CUDA GPU; not available in this workplace")
def test_real_engine_round_trip(tmp_path: Path) -> None:  # builds an identity engine, serves it
    trt: Any = importlib.import_module("tensorrt")
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(0)
    source = network.add_input("INPUT", trt.float32, (-1, 4))
    network.mark_output(network.add_identity(source).get_output(0))
    network.get_output(0).name = "OUTPUT"
    profile = builder.create_optimization_profile()
    profile.set_shape("INPUT", (1, 4), (4, 4), (8, 4))
    build = builder.create_builder_config()
    build.add_optimization_profile(profile)
    plan = tmp_path / "model.plan"
    plan.write_bytes(bytes(builder.build_serialized_network(network, build)))
    config = config_text('name: "m"')
    TensorrtRuntime.autocomplete(config, plan)
    runtime = TensorrtRuntime(config, plan, instance(0))
    batch = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(runtime.infer({"INPUT": batch}, ["OUTPUT"])["OUTPUT"], batch)
    runtime.unload()
