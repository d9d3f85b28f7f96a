"""Model config → onnxruntime session settings: the options and execution providers of one instance.

Read once per instance by services/onnx/runtime.py while it loads a model. The names are the
ones Triton's onnxruntime backend documents, so an existing ``config.pbtxt`` keeps its meaning:

- ``parameters``: ``intra_op_thread_count``, ``inter_op_thread_count``, ``execution_mode``
  (0 sequential, 1 parallel), ``enable_mem_arena``, ``enable_mem_pattern``,
  ``memory.enable_memory_arena_shrinkage`` (a run option), any ``session.*`` key (passed to ORT
  as a session config entry), and the CUDA keys ``cudnn_conv_algo_search``, ``gpu_mem_limit``,
  ``arena_extend_strategy``, ``do_copy_in_default_stream``;
- ``optimization.graph.level``: -1 basic, 1 extended, 2 none, anything else all optimizations;
- ``optimization.execution_accelerators``: ``tensorrt`` / ``cuda`` for GPU instances (their
  parameters mapped to the provider options), ``openvino`` for CPU instances;
- the instance kind: KIND_GPU runs on the CUDA provider on its device, KIND_CPU on the CPU.

Every problem is a ModelLoadError that names the model, the setting and what to write instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError
from services.core.runtime import InstanceSpec

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"

ProviderOptions = dict[str, str]

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}

#: Triton's TensorRT accelerator keys that are not simply ORT's ``trt_*`` names
_TRT_RENAMES = {
    "max_workspace_size_bytes": "trt_max_workspace_size",
    "int8_calibration_table_name": "trt_int8_calibration_table_name",
    "int8_use_native_calibration_table": "trt_int8_use_native_calibration_table",
}
_TRT_BOOL_KEYS = {
    "trt_int8_use_native_calibration_table",
    "trt_dla_enable",
    "trt_engine_cache_enable",
    "trt_dump_subgraphs",
    "trt_force_sequential_engine_build",
    "trt_context_memory_sharing_enable",
    "trt_layer_norm_fp32_fallback",
    "trt_timing_cache_enable",
    "trt_force_timing_cache",
    "trt_detailed_build_log",
    "trt_build_heuristics_enable",
    "trt_sparsity_enable",
    "trt_cuda_graph_enable",
    "trt_dump_ep_context_model",
}
_CUDA_CONV_SEARCH = {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"}
_CUDA_ARENA = {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"}
_GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


@dataclass(slots=True)
class SessionPlan:
    """Everything needed to create one InferenceSession besides the model file."""

    options: Any  # ort.SessionOptions
    providers: list[str]
    provider_options: list[ProviderOptions]
    run_config: dict[str, str] = field(default_factory=dict)


def string_parameters(config: mc.ModelConfig) -> dict[str, str]:
    """The config's ``parameters`` map as plain strings."""
    return {key: value.string_value for key, value in config.parameters.items()}


def _int(model: str, key: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ModelLoadError(
            f"model '{model}': parameter '{key}' must be an integer, got {value!r}"
        ) from None


def _bool(model: str, key: str, value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ModelLoadError(
        f"model '{model}': parameter '{key}' must be 1/0 or true/false, got {value!r}"
    )


def _choice(model: str, key: str, value: str, choices: Mapping[str, str]) -> str:
    if value.strip() not in choices:
        raise ModelLoadError(
            f"model '{model}': parameter '{key}' must be one of {sorted(choices)}, got {value!r}"
        )
    return choices[value.strip()]


#: ORT session config key for intra-op spin-waiting; off by default here (see session_options)
SPINNING_KEY = "session.intra_op.allow_spinning"


def session_options(config: mc.ModelConfig, params: Mapping[str, str]) -> Any:
    """SessionOptions from the config's parameters and graph optimization level."""
    model = config.name
    options = ort.SessionOptions()
    if "intra_op_thread_count" in params:
        options.intra_op_num_threads = _int(
            model, "intra_op_thread_count", params["intra_op_thread_count"]
        )
    if "inter_op_thread_count" in params:
        options.inter_op_num_threads = _int(
            model, "inter_op_thread_count", params["inter_op_thread_count"]
        )
    if "execution_mode" in params:
        mode = _int(model, "execution_mode", params["execution_mode"])
        if mode not in (0, 1):
            raise ModelLoadError(
                f"model '{model}': parameter 'execution_mode' must be 0 (sequential) or "
                f"1 (parallel), got {mode}"
            )
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if mode == 1 else ort.ExecutionMode.ORT_SEQUENTIAL
        )
    if "enable_mem_arena" in params:
        options.enable_cpu_mem_arena = _bool(model, "enable_mem_arena", params["enable_mem_arena"])
    if "enable_mem_pattern" in params:
        options.enable_mem_pattern = _bool(
            model, "enable_mem_pattern", params["enable_mem_pattern"]
        )
    for key, value in params.items():
        if key.startswith("session."):
            options.add_session_config_entry(key, value)
    if SPINNING_KEY not in params:
        # The intra-op pool's spin-wait keeps a core busy between runs; in a Python server that
        # core is the event loop's, and under load throughput halves. Opt back in per model.
        options.add_session_config_entry(SPINNING_KEY, "0")
    level = config.optimization.graph.level if config.optimization.HasField("graph") else 0
    options.graph_optimization_level = _GRAPH_LEVELS.get(
        level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    return options


def _tensorrt_options(model: str, accel: Any, device_id: int) -> ProviderOptions:
    """Triton's ``tensorrt`` accelerator parameters as TensorRT provider options."""
    options: ProviderOptions = {"device_id": str(device_id)}
    for key, value in accel.parameters.items():
        if key == "precision_mode":
            mode = value.strip().upper()
            if mode not in ("FP32", "FP16", "INT8"):
                raise ModelLoadError(
                    f"model '{model}': tensorrt precision_mode must be FP32, FP16 or INT8, "
                    f"got {value!r}"
                )
            if mode == "FP16":
                options["trt_fp16_enable"] = "True"
            elif mode == "INT8":
                options["trt_int8_enable"] = "True"
            continue
        name = _TRT_RENAMES.get(key, key)
        if not name.startswith("trt_"):
            raise ModelLoadError(
                f"model '{model}': unknown tensorrt accelerator parameter '{key}'; use "
                "precision_mode, max_workspace_size_bytes, int8_* or an ORT 'trt_*' option"
            )
        options[name] = str(_bool(model, key, value)) if name in _TRT_BOOL_KEYS else value
    return options


def _cuda_options(
    model: str, params: Mapping[str, str], accel: Any | None, device_id: int
) -> ProviderOptions:
    """CUDA provider options: device, the (deprecated) config parameters, a ``cuda`` accelerator."""
    options: ProviderOptions = {"device_id": str(device_id)}
    if "cudnn_conv_algo_search" in params:
        options["cudnn_conv_algo_search"] = _choice(
            model, "cudnn_conv_algo_search", params["cudnn_conv_algo_search"], _CUDA_CONV_SEARCH
        )
    if "gpu_mem_limit" in params:
        options["gpu_mem_limit"] = str(_int(model, "gpu_mem_limit", params["gpu_mem_limit"]))
    if "arena_extend_strategy" in params:
        options["arena_extend_strategy"] = _choice(
            model, "arena_extend_strategy", params["arena_extend_strategy"], _CUDA_ARENA
        )
    if "do_copy_in_default_stream" in params:
        flag = _bool(model, "do_copy_in_default_stream", params["do_copy_in_default_stream"])
        options["do_copy_in_default_stream"] = "1" if flag else "0"
    if accel is not None:
        options.update(dict(accel.parameters))
    return options


_DISPLAY = {CUDA: "CUDA", TENSORRT: "TensorRT", OPENVINO: "OpenVINO"}


def _require(model: str, wanted: str, available: Sequence[str], hint: str) -> None:
    if wanted not in available:
        raise ModelLoadError(
            f"model '{model}' asks for the {_DISPLAY.get(wanted, wanted)} execution provider "
            f"but this onnxruntime build offers {list(available)}; {hint}"
        )


def _gpu_providers(
    config: mc.ModelConfig, params: Mapping[str, str], device_id: int, available: Sequence[str]
) -> list[tuple[str, ProviderOptions]]:
    model = config.name
    device = max(device_id, 0)
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    tensorrt = None
    cuda = None
    for accel in accelerators:
        if accel.name == "tensorrt":
            tensorrt = accel
        elif accel.name == "cuda":
            cuda = accel
        else:
            raise ModelLoadError(
                f"model '{model}': unknown gpu_execution_accelerator '{accel.name}'; "
                "the onnxruntime backend knows 'tensorrt' and 'cuda'"
            )
    plan: list[tuple[str, ProviderOptions]] = []
    if tensorrt is not None:
        _require(
            model,
            TENSORRT,
            available,
            "install an onnxruntime-gpu build with TensorRT or drop the tensorrt accelerator",
        )
        plan.append((TENSORRT, _tensorrt_options(model, tensorrt, device)))
    _require(model, CUDA, available, "install onnxruntime-gpu or use KIND_CPU")
    plan.append((CUDA, _cuda_options(model, params, cuda, device)))
    return plan


def _cpu_providers(
    config: mc.ModelConfig, available: Sequence[str]
) -> list[tuple[str, ProviderOptions]]:
    model = config.name
    plan: list[tuple[str, ProviderOptions]] = []
    for accel in config.optimization.execution_accelerators.cpu_execution_accelerator:
        if accel.name != "openvino":
            raise ModelLoadError(
                f"model '{model}': unknown cpu_execution_accelerator '{accel.name}'; "
                "the onnxruntime backend knows 'openvino'"
            )
        _require(
            model,
            OPENVINO,
            available,
            "install onnxruntime-openvino or drop the openvino accelerator",
        )
        plan.append((OPENVINO, dict(accel.parameters)))
    return plan


def plan_session(
    config: mc.ModelConfig, instance: InstanceSpec, available: Sequence[str] | None = None
) -> SessionPlan:
    """Session options, providers (in priority order, CPU last) and run options for one instance.

    KIND_AUTO runs on the GPU when this onnxruntime build has CUDA, else on the CPU; KIND_MODEL
    runs like KIND_CPU. ``available`` defaults to this build's providers (tests pass their own).
    """
    if available is None:
        available = ort.get_available_providers()
    params = string_parameters(config)
    kind = instance.kind
    if kind == mc.ModelInstanceGroup.KIND_AUTO:
        has_cuda = CUDA in available
        kind = mc.ModelInstanceGroup.KIND_GPU if has_cuda else mc.ModelInstanceGroup.KIND_CPU
    if kind == mc.ModelInstanceGroup.KIND_GPU:
        chosen = _gpu_providers(config, params, instance.device_id, available)
    else:
        chosen = _cpu_providers(config, available)
    chosen.append((CPU, {}))
    run_config: dict[str, str] = {}
    if "memory.enable_memory_arena_shrinkage" in params:
        run_config["memory.enable_memory_arena_shrinkage"] = params[
            "memory.enable_memory_arena_shrinkage"
        ]
    return SessionPlan(
        options=session_options(config, params),
        providers=[name for name, _ in chosen],
        provider_options=[opts for _, opts in chosen],
        run_config=run_config,
    )
