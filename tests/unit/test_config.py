"""config.pbtxt parsing, Triton's defaults and the validation rules with their messages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from protos.gen.inference import model_config_pb2 as mc
from services.core.config import (
    apply_defaults,
    load_config_file,
    parse_config_json,
    parse_config_text,
    validate_config,
)
from services.core.errors import ModelLoadError

#: a change made to a valid config; its return value is ignored
Edit = Callable[[mc.ModelConfig], object]

FULL_CONFIG = """
name: "resnet"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { specific: { versions: [1, 3] } }
input [
  {
    name: "INPUT0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  },
  {
    name: "SCALAR"
    data_type: TYPE_INT64
    dims: [ 1 ]
    reshape: { shape: [ ] }
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 5000 }
  priority_queue_policy {
    key: 1
    value: { timeout_action: REJECT max_queue_size: 16 allow_timeout_override: true }
  }
}
instance_group [
  { count: 2 kind: KIND_CPU },
  { name: "extra" kind: KIND_AUTO }
]
optimization {
  execution_accelerators {
    cpu_execution_accelerator : [ { name : "openvino" } ]
    gpu_execution_accelerator : [
      { name : "tensorrt" parameters { key: "precision_mode" value: "FP16" } }
    ]
  }
  input_pinned_memory { enable: false }
}
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 2
    inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [3, 224, 224] zero_data: true } }
  }
]
response_cache { enable: true }
"""

ENSEMBLE_CONFIG = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 4
input [ { name: "RAW" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "SCORES" data_type: TYPE_FP32 dims: [ 10 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "preprocess"
      model_version: -1
      input_map { key: "IN" value: "RAW" }
      output_map { key: "OUT" value: "pixels" }
    },
    {
      model_name: "classifier"
      model_version: 2
      input_map { key: "INPUT0" value: "pixels" }
      output_map { key: "OUTPUT0" value: "SCORES" }
    }
  ]
}
"""


def _valid(text: str = FULL_CONFIG, name: str = "resnet") -> mc.ModelConfig:
    config = parse_config_text(text, "test")
    apply_defaults(config)
    validate_config(config, name)
    return config


def test_parses_full_triton_config() -> None:
    config = _valid()
    assert config.max_batch_size == 8
    assert list(config.version_policy.specific.versions) == [1, 3]
    assert config.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert list(config.input[1].reshape.shape) == []
    assert config.input[1].HasField("reshape")
    db = config.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8]
    assert db.default_queue_policy.timeout_action == mc.ModelQueuePolicy.DELAY
    assert db.priority_queue_policy[1].max_queue_size == 16
    accel = config.optimization.execution_accelerators
    assert accel.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP16"
    assert accel.cpu_execution_accelerator[0].name == "openvino"
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    assert config.model_warmup[0].inputs["INPUT0"].zero_data
    assert config.output[0].label_filename == "labels.txt"


def test_parses_ensemble_and_sequence_configs() -> None:
    config = _valid(ENSEMBLE_CONFIG, "pipeline")
    steps = config.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["preprocess", "classifier"]
    assert steps[0].model_version == -1 and steps[1].output_map["OUTPUT0"] == "SCORES"
    assert not config.instance_group  # ensembles get no instance group
    seq = parse_config_text(
        """
        name: "seq" backend: "python" max_batch_size: 2
        sequence_batching {
          oldest { max_candidate_sequences: 4 preferred_batch_size: [2] }
          control_input [
            { name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [0, 1] } ] },
            { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
          ]
          state [ { input_name: "IN_STATE" output_name: "OUT_STATE" data_type: TYPE_INT32
                    dims: [ -1 ] initial_state: { data_type: TYPE_INT32 dims: [1]
                    zero_data: true name: "init" } } ]
        }
        """,
        "seq",
    )
    apply_defaults(seq)
    validate_config(seq, "seq")
    assert seq.sequence_batching.max_sequence_idle_microseconds == 1_000_000
    assert seq.sequence_batching.oldest.max_candidate_sequences == 4


def test_defaults_follow_triton() -> None:
    config = parse_config_text('name: "m" backend: "onnxruntime"', "m")
    apply_defaults(config)
    assert config.version_policy.latest.num_versions == 1
    [group] = config.instance_group
    assert (group.name, group.kind, group.count) == ("m", mc.ModelInstanceGroup.KIND_CPU, 1)
    assert config.optimization.input_pinned_memory.enable
    full = _valid()
    assert [g.name for g in full.instance_group] == ["resnet_0", "extra"]
    assert [g.count for g in full.instance_group] == [2, 1]
    assert all(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in full.instance_group)
    assert not full.optimization.input_pinned_memory.enable  # user's choice is kept


def test_auto_kind_becomes_gpu_when_gpus_exist() -> None:
    config = parse_config_text('name: "m" instance_group [{ kind: KIND_AUTO }, { gpus: [5] }]', "")
    apply_defaults(config, gpu_count=2)
    gpu, cpu = config.instance_group
    assert gpu.kind == mc.ModelInstanceGroup.KIND_GPU and list(gpu.gpus) == [0, 1]
    assert cpu.kind == mc.ModelInstanceGroup.KIND_CPU  # gpu 5 does not exist here
    with pytest.raises(ModelLoadError, match="kind KIND_CPU but lists gpus \\[5\\]"):
        validate_config(config, "m", gpu_count=2)  # as in Triton: the CPU group keeps its gpus


def test_bad_text_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "simple" / "config.pbtxt"
    path.parent.mkdir()
    path.write_text('name: "simple"\nmax_batch_size: 8\n\ninput [\n  { nam: "x" }\n]\n')
    with pytest.raises(ModelLoadError) as info:
        load_config_file(path)
    message = info.value.message
    assert message.startswith(f"{path}:5:5: ")
    assert "nam" in message


def test_bad_enum_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^models/m/config.pbtxt:1:\d+: .*TYPE_FLOAT"):
        parse_config_text("input [{ data_type: TYPE_FLOAT }]", "models/m/config.pbtxt")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_config_file(tmp_path / "missing.pbtxt")


def test_parse_config_json_as_load_request_sends_it() -> None:
    text = (
        '{"name": "m", "backend": "onnxruntime", "max_batch_size": 4,'
        ' "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [-1, 3]}],'
        ' "dynamic_batching": {"max_queue_delay_microseconds": "100",'
        ' "priority_queue_policy": {"1": {"max_queue_size": 2}}, "priority_levels": 1,'
        ' "default_priority_level": 1}}'
    )
    config = parse_config_json(text, "load of 'm'")
    assert list(config.input[0].dims) == [-1, 3]
    assert config.dynamic_batching.priority_queue_policy[1].max_queue_size == 2
    with pytest.raises(ModelLoadError, match="load of 'm': the 'config' parameter"):
        parse_config_json('{"name": 3, "bogus": 1}', "load of 'm'")


def _edit(edit: Edit, text: str = FULL_CONFIG) -> mc.ModelConfig:
    config = parse_config_text(text, "test")
    apply_defaults(config)
    edit(config)
    return config


def _set_invalid(attr: str, value: object) -> Edit:
    return lambda c: setattr(c, attr, value)


CASES: list[tuple[str, Edit, str]] = [
    ("negative batch", _set_invalid("max_batch_size", -1), "max_batch_size is -1; it must be >= 0"),
    ("unnamed input", lambda c: c.input.add(data_type=mc.TYPE_FP32, dims=[1]), "must set 'name'"),
    (
        "duplicate input",
        lambda c: c.input.add(name="INPUT0", data_type=mc.TYPE_FP32, dims=[1]),
        "input 'INPUT0' is declared twice",
    ),
    (
        "no data type",
        lambda c: c.output.add(name="X", dims=[1]),
        "output 'X' must set 'data_type'",
    ),
    ("no dims", lambda c: c.output.add(name="X", data_type=mc.TYPE_FP32), "must set 'dims'"),
    (
        "zero dim",
        lambda c: c.output.add(name="X", data_type=mc.TYPE_FP32, dims=[0, 2]),
        "each must be >= 1, or -1",
    ),
    (
        "reshape size",
        lambda c: c.input[1].reshape.shape.extend([2]),
        "differ in size",
    ),
    (
        "format dims",
        lambda c: c.input[0].dims.pop(),
        "format FORMAT_NCHW needs exactly 3 dims",
    ),
    (
        "preferred above max",
        lambda c: c.dynamic_batching.preferred_batch_size.append(16),
        "preferred_batch_size 16 exceeds max_batch_size 8",
    ),
    (
        "preferred zero",
        lambda c: c.dynamic_batching.preferred_batch_size.append(0),
        "preferred_batch_size 0 must be > 0",
    ),
    (
        "default priority out of range",
        lambda c: setattr(c.dynamic_batching, "default_priority_level", 3),
        "default_priority_level 3 must be in [1, 2]",
    ),
    (
        "queue policy key out of range",
        lambda c: c.dynamic_batching.priority_queue_policy[7].SetInParent(),
        "priority_queue_policy levels [7] must be in [1, 2]",
    ),
    (
        "preserve ordering with priorities",
        lambda c: setattr(c.dynamic_batching, "preserve_ordering", True),
        "preserve_ordering allows only one priority level",
    ),
    (
        "instance count",
        lambda c: setattr(c.instance_group[0], "count", -1),
        "instance_group 'resnet_0' count is -1",
    ),
    (
        "cpu with gpus",
        lambda c: c.instance_group[0].gpus.append(0),
        "kind KIND_CPU but lists gpus [0]",
    ),
    (
        "gpu without gpus",
        lambda c: setattr(c.instance_group[1], "kind", mc.ModelInstanceGroup.KIND_GPU),
        "kind KIND_GPU but no GPU is available",
    ),
    (
        "empty specific policy",
        lambda c: c.version_policy.specific.ClearField("versions"),
        "specific must list at least one version",
    ),
    (
        "latest zero",
        lambda c: setattr(c.version_policy.latest, "num_versions", 0),
        "latest.num_versions must be >= 1",
    ),
    (
        "warmup batch",
        lambda c: setattr(c.model_warmup[0], "batch_size", 9),
        "model_warmup 'zeros' batch_size 9 must be in [1, 8]",
    ),
    (
        "warmup unknown input",
        lambda c: c.model_warmup[0].inputs["NOPE"].CopyFrom(c.model_warmup[0].inputs["INPUT0"]),
        "input 'NOPE' is not a declared input",
    ),
    (
        "decoupled with cache",
        lambda c: setattr(c.model_transaction_policy, "decoupled", True),
        "response_cache cannot be enabled for a decoupled model",
    ),
    (
        "ensemble scheduling on a plain model",
        lambda c: c.ensemble_scheduling.step.add(model_name="x"),
        'only allowed with platform: "ensemble"',
    ),
    (
        "shape tensor outside TensorRT",
        lambda c: setattr(c.input[0], "is_shape_tensor", True),
        "shape tensors are only supported for platform tensorrt_plan",
    ),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_rules(edit: Edit, expected: str) -> None:
    config = _edit(edit)
    with pytest.raises(ModelLoadError) as info:
        validate_config(config, "resnet")
    assert info.value.message.startswith("model 'resnet': ")
    assert expected in info.value.message


def test_name_must_match_directory() -> None:
    config = _edit(lambda c: None)
    with pytest.raises(ModelLoadError, match="does not match its directory; set name"):
        validate_config(config, "other")


def test_dynamic_batching_without_batching_is_allowed_as_in_triton() -> None:
    config = _edit(lambda c: None, 'name: "m" max_batch_size: 0 dynamic_batching { }')
    validate_config(config, "m")


def test_ensemble_rules() -> None:
    def no_steps(c: mc.ModelConfig) -> None:
        c.ensemble_scheduling.ClearField("step")

    config = _edit(no_steps, ENSEMBLE_CONFIG)
    with pytest.raises(ModelLoadError, match="must list at least one step"):
        validate_config(config, "pipeline")
    config = _edit(
        lambda c: c.ensemble_scheduling.step[1].ClearField("output_map"), ENSEMBLE_CONFIG
    )
    with pytest.raises(ModelLoadError, match="ensemble step 1 must set 'output_map'"):
        validate_config(config, "pipeline")
    config = _edit(lambda c: c.instance_group.add(count=1), ENSEMBLE_CONFIG)
    with pytest.raises(ModelLoadError, match="must not set instance_group"):
        validate_config(config, "pipeline")
