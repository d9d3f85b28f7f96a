"""Model configuration: parse config.pbtxt (or a load request's JSON), fill defaults, validate.

Data flow: repository.py finds `<repo>/<model>/config.pbtxt` → `load_config_file` parses it into
the protobuf `inference.ModelConfig` → the runtime's autocomplete fills what the file leaves out →
`apply_defaults` adds Triton's defaults → `validate_config` rejects what Triton rejects, with a
message that says what to fix → model.py / the batcher read the result; the ModelConfig RPC serves
it back. Every failure is a ModelLoadError: that model fails to load, the repository keeps serving.

Rules follow Triton's core (model_config_utils: NormalizeModelConfig, NormalizeInstanceGroup,
ValidateModelConfig, ValidateIOShape, ValidateInstanceGroup). Deliberate differences are named
where they happen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from google.protobuf import json_format, text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core import ragged
from services.core.errors import ModelLoadError

#: Triton's default for sequence_batching.max_sequence_idle_microseconds (1 s).
SEQUENCE_IDLE_DEFAULT_US = 1_000_000
ENSEMBLE_PLATFORM = "ensemble"
TENSORRT_PLATFORM = "tensorrt_plan"
WILDCARD = -1

_Group = mc.ModelInstanceGroup


def parse_config_text(text: str, source: str) -> mc.ModelConfig:
    """Parse protobuf text (config.pbtxt); errors read "<source>:<line>:<col>: <complaint>"."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        line, column = err.GetLine(), err.GetColumn()
        complaint = str(err)
        prefix = f"{line}:{column} : "
        if complaint.startswith(prefix):
            complaint = complaint[len(prefix) :]
        where = f"{source}:{line}:{column}" if line else source
        raise ModelLoadError(
            f"{where}: {complaint} (the file must be protobuf text of inference.ModelConfig)"
        ) from err
    return config


def load_config_file(path: Path | str) -> mc.ModelConfig:
    """Read and parse one config.pbtxt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{path}: not UTF-8 text ({err}); save the file as UTF-8") from err
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot read the model configuration: {err}") from err
    return parse_config_text(text, str(path))


def parse_config_json(text: str, source: str) -> mc.ModelConfig:
    """Parse ModelConfig JSON, as RepositoryModelLoad's `config` parameter carries it."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as err:
        raise ModelLoadError(
            f"{source}: the 'config' parameter is not valid ModelConfig JSON: {err}"
        ) from err
    return config


def apply_defaults(config: mc.ModelConfig, gpu_count: int = 0) -> None:
    """Fill Triton's defaults in place; call after autocomplete, before validate_config.

    - version_policy: latest { num_versions: 1 }.
    - sequence_batching: max_sequence_idle_microseconds 1 s when 0.
    - optimization input/output pinned memory enabled when unset (not for ensembles).
    - instance_group (not for ensembles): none → one group named after the model; unnamed groups
      are named "<model>_<index>"; KIND_AUTO → KIND_GPU when `gpu_count` GPUs exist and every
      listed gpu is one of them, else KIND_CPU; count < 1 → 1; KIND_GPU without gpus → all GPUs.

    Differences from Triton: an empty preferred_batch_size stays empty (Triton fills in
    max_batch_size; the batcher treats both alike), and the default count is always 1 (Triton uses
    2 for CPU groups of the onnxruntime and tensorflow backends).
    """
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    sequence = config.sequence_batching
    if config.HasField("sequence_batching") and sequence.max_sequence_idle_microseconds == 0:
        sequence.max_sequence_idle_microseconds = SEQUENCE_IDLE_DEFAULT_US
    if config.HasField("ensemble_scheduling"):
        return
    if not config.optimization.HasField("input_pinned_memory"):
        config.optimization.input_pinned_memory.enable = True
    if not config.optimization.HasField("output_pinned_memory"):
        config.optimization.output_pinned_memory.enable = True
    if not config.instance_group:
        config.instance_group.add(name=config.name)
    available = range(gpu_count)
    for index, group in enumerate(config.instance_group):
        if not group.name:
            group.name = f"{config.name}_{index}"
        if group.kind == _Group.KIND_AUTO:
            usable = gpu_count > 0 and all(g in available for g in group.gpus)
            group.kind = _Group.KIND_GPU if usable else _Group.KIND_CPU
        if group.count < 1:
            group.count = 1
        if group.kind == _Group.KIND_GPU and not group.gpus:
            group.gpus.extend(available)


def validate_config(config: mc.ModelConfig, model_dir_name: str, gpu_count: int = 0) -> None:
    """Raise ModelLoadError naming the model and the fix for the first problem found."""
    if not config.name:
        raise ModelLoadError(f"model '{model_dir_name}': config must set 'name'")
    if config.name != model_dir_name:
        raise ModelLoadError(
            f"model '{model_dir_name}': config name '{config.name}' does not match its "
            f'directory; set name: "{model_dir_name}" or rename the directory'
        )
    problem = _first_problem(config, gpu_count)
    if problem:
        raise ModelLoadError(f"model '{config.name}': {problem}")


def _first_problem(config: mc.ModelConfig, gpu_count: int) -> str | None:
    if config.max_batch_size < 0:
        return f"max_batch_size is {config.max_batch_size}; it must be >= 0 (0 = no batching)"
    checks = (
        _version_policy_problem(config.version_policy),
        _io_problem(config),
        ragged.config_problem(config),
        _dynamic_batching_problem(config),
        _sequence_batching_problem(config),
        _ensemble_problem(config),
        _instance_group_problem(config, gpu_count),
        _warmup_problem(config),
        _misc_problem(config),
    )
    return next((p for p in checks if p), None)


def _version_policy_problem(policy: mc.ModelVersionPolicy) -> str | None:
    choice = policy.WhichOneof("policy_choice")
    if choice is None:
        return "version_policy must be one of latest, all or specific"
    if choice == "latest" and policy.latest.num_versions < 1:
        return "version_policy latest.num_versions must be >= 1"
    if choice == "specific":
        if not policy.specific.versions:
            return "version_policy specific must list at least one version"
        bad = [v for v in policy.specific.versions if v < 1]
        if bad:
            return f"version_policy specific lists {bad}; versions are positive integers"
    return None


def _dims_problem(what: str, dims: Sequence[int]) -> str | None:
    bad = [d for d in dims if d < 1 and d != WILDCARD]
    if bad:
        return f"{what} has {list(dims)}; each must be >= 1, or -1 for a variable size"
    return None


def _chunks(dims: Iterable[int]) -> list[int]:
    """Element counts of the runs between variable-size dims: [2, 4, -1, 6] → [8, 6]."""
    counts, current = [], 1
    for d in dims:
        if d == WILDCARD:
            counts.append(current)
            current = 1
        else:
            current *= d
    counts.append(current)
    return counts


def _tensor_problem(kind: str, io: mc.ModelInput | mc.ModelOutput, config: mc.ModelConfig) -> str:
    if not io.name:
        return f"every {kind} must set 'name'"
    label = f"{kind} '{io.name}'"
    if io.data_type == mc.TYPE_INVALID:
        return f"{label} must set 'data_type' (e.g. TYPE_FP32)"
    if not io.dims:
        return f"{label} must set 'dims' (use dims: [1] with reshape: {{ shape: [] }} for scalars)"
    problem = _dims_problem(f"{label} dims", io.dims)
    if problem:
        return problem
    if io.HasField("reshape"):
        shape = io.reshape.shape
        if not shape and config.max_batch_size == 0:
            return f"{label} has an empty reshape, which a non-batching model cannot serve"
        problem = _dims_problem(f"{label} reshape", shape)
        if problem:
            return problem
        if not shape:
            if math.prod(io.dims) != 1:
                return f"{label}: an empty reshape needs dims with one element, e.g. [1]"
        elif _chunks(io.dims) != _chunks(shape):
            return f"{label}: dims {list(io.dims)} and reshape {list(shape)} differ in size"
    if io.is_shape_tensor and config.platform != TENSORRT_PLATFORM:
        return f"{label}: shape tensors are only supported for platform {TENSORRT_PLATFORM}"
    if io.is_non_linear_format_io and config.platform != TENSORRT_PLATFORM:
        return f"{label}: non-linear IO format is only supported for {TENSORRT_PLATFORM}"
    if (
        isinstance(io, mc.ModelInput)
        and io.format != mc.ModelInput.FORMAT_NONE
        and len(io.dims) != 3
    ):
        return f"{label}: format {mc.ModelInput.Format.Name(io.format)} needs exactly 3 dims"
    return ""


def _io_problem(config: mc.ModelConfig) -> str | None:
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for io in tensors:
            problem = _tensor_problem(kind, io, config)
            if problem:
                return problem
            if io.name in seen:
                return f"{kind} '{io.name}' is declared twice; tensor names must be unique"
            seen.add(io.name)
    return None


def _dynamic_batching_problem(config: mc.ModelConfig) -> str | None:
    if not config.HasField("dynamic_batching"):
        return None
    db = config.dynamic_batching
    for size in db.preferred_batch_size:
        if size <= 0:
            return f"dynamic_batching preferred_batch_size {size} must be > 0"
        if size > config.max_batch_size:
            return (
                f"dynamic_batching preferred_batch_size {size} exceeds max_batch_size "
                f"{config.max_batch_size}; lower it or raise max_batch_size"
            )
    levels = db.priority_levels
    if levels:
        if not 1 <= db.default_priority_level <= levels:
            level = db.default_priority_level
            return f"dynamic_batching default_priority_level {level} must be in [1, {levels}]"
        bad = sorted(k for k in db.priority_queue_policy if not 1 <= k <= levels)
        if bad:
            return f"dynamic_batching priority_queue_policy levels {bad} must be in [1, {levels}]"
    if db.preserve_ordering:
        if levels > 1:
            return "dynamic_batching preserve_ordering allows only one priority level"
        policies = [db.default_queue_policy, *db.priority_queue_policy.values()]
        if any(
            p.default_timeout_microseconds and p.timeout_action == mc.ModelQueuePolicy.DELAY
            for p in policies
        ):
            return "dynamic_batching preserve_ordering cannot use timeout_action DELAY"
    return None


def _sequence_batching_problem(config: mc.ModelConfig) -> str | None:
    if not config.HasField("sequence_batching"):
        return None
    sb = config.sequence_batching
    if config.response_cache.enable:
        return "response_cache cannot be enabled with sequence_batching; disable the cache"
    seen: set[str] = set()
    for control in sb.control_input:
        if not control.name:
            return "sequence_batching control_input must set 'name'"
        if control.name in seen:
            return f"sequence_batching control_input '{control.name}' is listed twice"
        seen.add(control.name)
    kinds = [c.kind for ci in sb.control_input for c in ci.control]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        names = [mc.ModelSequenceBatching.Control.Kind.Name(k) for k in repeated]
        return f"sequence_batching control {names} is given more than once"
    if sb.HasField("oldest"):
        for size in sb.oldest.preferred_batch_size:
            if size <= 0 or size > config.max_batch_size:
                return (
                    f"sequence_batching oldest preferred_batch_size {size} must be in "
                    f"[1, max_batch_size={config.max_batch_size}]"
                )
    if sb.HasField("direct") and not 0.0 <= sb.direct.minimum_slot_utilization <= 1.0:
        return "sequence_batching direct.minimum_slot_utilization must be in (0.0, 1.0]"
    return None


def _ensemble_problem(config: mc.ModelConfig) -> str | None:
    is_ensemble = config.platform == ENSEMBLE_PLATFORM
    if not config.HasField("ensemble_scheduling"):
        if is_ensemble:
            return "platform 'ensemble' needs an ensemble_scheduling section with its steps"
        return None
    if not is_ensemble:
        return 'ensemble_scheduling is only allowed with platform: "ensemble"'
    if config.instance_group:
        return "an ensemble must not set instance_group (its steps have their own)"
    if config.model_warmup:
        return "an ensemble must not set model_warmup"
    if not config.ensemble_scheduling.step:
        return "ensemble_scheduling must list at least one step"
    for index, step in enumerate(config.ensemble_scheduling.step):
        for field in ("model_name", "input_map", "output_map"):
            if not getattr(step, field):
                return f"ensemble step {index} must set '{field}'"
    return None


def _instance_group_problem(config: mc.ModelConfig, gpu_count: int) -> str | None:
    if config.HasField("ensemble_scheduling"):
        return None
    if not config.instance_group:
        return "no instance_group; call apply_defaults before validate_config"
    for group in config.instance_group:
        label = f"instance_group '{group.name}'"
        if group.count < 1:
            return f"{label} count is {group.count}; it must be >= 1"
        if group.kind in (_Group.KIND_CPU, _Group.KIND_MODEL) and group.gpus:
            kind = _Group.Kind.Name(group.kind)
            return f"{label} has kind {kind} but lists gpus {list(group.gpus)}; remove gpus"
        if group.kind == _Group.KIND_GPU:
            if gpu_count == 0:
                return f"{label} has kind KIND_GPU but no GPU is available; use KIND_CPU"
            bad = [g for g in group.gpus if not 0 <= g < gpu_count]
            if bad or not group.gpus:
                return f"{label} lists gpus {bad or []}; available GPUs: 0..{gpu_count - 1}"
        if group.kind == _Group.KIND_AUTO:
            return f"{label} still has kind KIND_AUTO; call apply_defaults first"
        if group.profile and config.platform != TENSORRT_PLATFORM:
            return f"{label} sets 'profile', which only {TENSORRT_PLATFORM} models support"
    return None


def _warmup_problem(config: mc.ModelConfig) -> str | None:
    inputs = {i.name for i in config.input}
    limit = max(config.max_batch_size, 1)
    for sample in config.model_warmup:
        label = f"model_warmup '{sample.name}'"
        if not sample.name:
            return "every model_warmup entry must set 'name'"
        if not 1 <= sample.batch_size <= limit:
            return f"{label} batch_size {sample.batch_size} must be in [1, {limit}]"
        for name, spec in sample.inputs.items():
            if inputs and name not in inputs:
                return f"{label} input '{name}' is not a declared input"
            if spec.data_type == mc.TYPE_INVALID:
                return f"{label} input '{name}' must set 'data_type'"
            if spec.WhichOneof("input_data_type") is None:
                return f"{label} input '{name}' must set zero_data, random_data or input_data_file"
            problem = _dims_problem(f"{label} input '{name}' dims", spec.dims)
            if problem or any(d == WILDCARD for d in spec.dims):
                return problem or f"{label} input '{name}' dims must be fixed sizes (no -1)"
    return None


def _misc_problem(config: mc.ModelConfig) -> str | None:
    if config.model_transaction_policy.decoupled and config.response_cache.enable:
        return "response_cache cannot be enabled for a decoupled model; disable the cache"
    for control in config.model_metrics.metric_control:
        if not control.metric_identifier.family:
            return "model_metrics metric_control must set metric_identifier.family"
        if not control.histogram_options.buckets:
            return "model_metrics metric_control must set histogram_options.buckets"
    return None
