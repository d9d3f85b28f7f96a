"""Model config → how a torch model runs: device, thread pools and execution switches.

Read by services/torch/runtime.py while it loads an instance. Parameter names are those of
Triton's PyTorch backend, so an existing ``config.pbtxt`` keeps its meaning:

- ``INTRA_OP_THREAD_COUNT`` / ``INTER_OP_THREAD_COUNT`` (integers > 0): torch's intra-op and
  inter-op pools. Both are process-wide in torch; as in Triton, the first model that sets a
  value wins and later different values are ignored with a warning. torch refuses to resize the
  inter-op pool once it has been used, which is also reported as a warning, not a failure.
- ``INFERENCE_MODE`` (default true): run under ``torch.inference_mode()``; false runs under
  ``torch.no_grad()`` (for models whose ops reject inference tensors).
- ``DISABLE_OPTIMIZED_EXECUTION`` (default false): TorchScript's profiling/optimizing executor
  off (``torch.jit.optimized_execution(False)``), which avoids the slow first few calls.

Device: KIND_GPU instances run on ``cuda:<device_id>`` (a ModelLoadError when this torch has no
CUDA device); KIND_CPU, KIND_MODEL and KIND_AUTO run on the CPU (the kit resolves KIND_AUTO
before instances are created).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError
from services.core.runtime import InstanceSpec

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}

INTRA_OP = "INTRA_OP_THREAD_COUNT"
INTER_OP = "INTER_OP_THREAD_COUNT"
INFERENCE_MODE = "INFERENCE_MODE"
DISABLE_OPTIMIZED_EXECUTION = "DISABLE_OPTIMIZED_EXECUTION"


@dataclass(frozen=True, slots=True)
class RunPlan:
    """How one instance runs."""

    device: torch.device
    inference_mode: bool
    optimized_execution: bool


def _params(config: mc.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def _bool(model: str, key: str, value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ModelLoadError(
        f"model '{model}': parameter '{key}' must be true/false (or 1/0), got {value!r}"
    )


def _count(model: str, key: str, value: str) -> int:
    try:
        count = int(value.strip())
    except ValueError:
        count = 0
    if count < 1:
        raise ModelLoadError(
            f"model '{model}': parameter '{key}' must be a positive integer, got {value!r}"
        )
    return count


def device_for(model: str, instance: InstanceSpec) -> torch.device:
    """The torch device of one instance; GPU instances need a CUDA device in this torch build."""
    if instance.kind != mc.ModelInstanceGroup.KIND_GPU:
        return torch.device("cpu")
    device_id = max(instance.device_id, 0)
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"model '{model}': instance {instance.name} is KIND_GPU but this torch build has "
            f"no CUDA device (torch {torch.__version__}); use KIND_CPU or install a CUDA torch"
        )
    if device_id >= torch.cuda.device_count():
        raise ModelLoadError(
            f"model '{model}': instance {instance.name} asks for GPU {device_id} but torch sees "
            f"{torch.cuda.device_count()} CUDA device(s); list gpus between 0 and "
            f"{torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda", device_id)


class _ThreadPools:
    """The process-wide torch pools: the first value set for each wins (as in Triton)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chosen: dict[str, tuple[int, str]] = {}

    def apply(self, model: str, key: str, count: int) -> None:
        with self._lock:
            if key in self._chosen:
                first, owner = self._chosen[key]
                if first != count:
                    logger.warning(
                        "model '%s': %s %d ignored; torch's pool is process-wide and model "
                        "'%s' already set it to %d",
                        model,
                        key,
                        count,
                        owner,
                        first,
                    )
                return
            try:
                if key == INTRA_OP:
                    torch.set_num_threads(count)
                else:
                    torch.set_num_interop_threads(count)
            except RuntimeError as exc:
                logger.warning("model '%s': cannot set %s to %d: %s", model, key, count, exc)
                return
            self._chosen[key] = (count, model)
            logger.info("model '%s': %s set to %d for this process", model, key, count)


THREAD_POOLS = _ThreadPools()


def plan_run(config: mc.ModelConfig, instance: InstanceSpec) -> RunPlan:
    """Device and execution switches for one instance; applies the thread settings."""
    model = config.name
    params: Mapping[str, str] = _params(config)
    device = device_for(model, instance)
    for key in (INTRA_OP, INTER_OP):
        if key in params:
            THREAD_POOLS.apply(model, key, _count(model, key, params[key]))
    inference_mode = _bool(model, INFERENCE_MODE, params.get(INFERENCE_MODE, "true"))
    disable = _bool(
        model, DISABLE_OPTIMIZED_EXECUTION, params.get(DISABLE_OPTIMIZED_EXECUTION, "false")
    )
    return RunPlan(device=device, inference_mode=inference_mode, optimized_execution=not disable)
