"""Model config → how a SavedModel loads and runs: graph tag, signature, thread pools, device.

Read by services/tensorflow/runtime.py (and autocomplete) while it loads a model. Parameter names
are those of Triton's TensorFlow backend, so an existing ``config.pbtxt`` keeps its meaning:

- ``TF_SIGNATURE_DEF`` (default ``serving_default``): the signature to serve;
- ``TF_GRAPH_TAG`` (default ``serve``): the tag of the MetaGraph to load;
- ``TF_NUM_INTRA_THREADS`` / ``TF_NUM_INTER_THREADS`` (integers >= 0, 0 = TensorFlow chooses):
  TensorFlow's intra-op and inter-op pools. Both are process-wide in TensorFlow 2 and fixed once
  TensorFlow has started running anything, so the first model loaded (before TensorFlow runs)
  sets them; a later model asking for other values is served with the pools as they are, and a
  warning says so. Put these parameters on the first model the service loads.

Device: this service is built on tensorflow-cpu; a KIND_GPU instance fails to load unless
TensorFlow sees a GPU. KIND_CPU, KIND_MODEL and KIND_AUTO run on the CPU.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import tensorflow as tf  # type: ignore[import-untyped]  # no py.typed in tensorflow

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError
from services.core.runtime import InstanceSpec

logger = logging.getLogger(__name__)

SIGNATURE_DEF = "TF_SIGNATURE_DEF"
GRAPH_TAG = "TF_GRAPH_TAG"
INTRA_THREADS = "TF_NUM_INTRA_THREADS"
INTER_THREADS = "TF_NUM_INTER_THREADS"
DEFAULT_SIGNATURE = "serving_default"
DEFAULT_TAG = "serve"


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What to load and how: graph tag, signature name and the asked-for pool sizes (0 = auto)."""

    tag: str
    signature: str
    intra_threads: int
    inter_threads: int


def _param(config: mc.ModelConfig, key: str) -> str | None:
    value = config.parameters.get(key)
    if value is None:
        return None
    return value.string_value.strip()


def _count(model: str, key: str, value: str | None) -> int:
    if value is None or value == "":
        return 0
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ModelLoadError(
            f"model '{model}': parameter '{key}' must be a non-negative integer (0 lets "
            f"TensorFlow choose), got {value!r}"
        )
    return count


def plan_load(config: mc.ModelConfig) -> LoadPlan:
    """The parameters of ``config`` that this family reads (see the module docstring)."""
    return LoadPlan(
        tag=_param(config, GRAPH_TAG) or DEFAULT_TAG,
        signature=_param(config, SIGNATURE_DEF) or DEFAULT_SIGNATURE,
        intra_threads=_count(config.name, INTRA_THREADS, _param(config, INTRA_THREADS)),
        inter_threads=_count(config.name, INTER_THREADS, _param(config, INTER_THREADS)),
    )


def check_device(model: str, instance: InstanceSpec) -> None:
    """KIND_GPU needs a GPU that this TensorFlow build can use."""
    if instance.kind != mc.ModelInstanceGroup.KIND_GPU:
        return
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        raise ModelLoadError(
            f"model '{model}': instance {instance.name} is KIND_GPU but TensorFlow "
            f"{tf.__version__} sees no GPU (this service is built on tensorflow-cpu); use "
            "KIND_CPU, or install a TensorFlow with CUDA support"
        )
    if instance.device_id >= len(gpus):
        raise ModelLoadError(
            f"model '{model}': instance {instance.name} asks for GPU {instance.device_id} but "
            f"TensorFlow sees {len(gpus)}; list gpus between 0 and {len(gpus) - 1}"
        )


class _ThreadPools:
    """TensorFlow's process-wide pools: set before TensorFlow runs, else left with a warning."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def apply(self, model: str, plan: LoadPlan) -> None:
        with self._lock:
            for key, count, getter, setter in (
                (
                    INTRA_THREADS,
                    plan.intra_threads,
                    tf.config.threading.get_intra_op_parallelism_threads,
                    tf.config.threading.set_intra_op_parallelism_threads,
                ),
                (
                    INTER_THREADS,
                    plan.inter_threads,
                    tf.config.threading.get_inter_op_parallelism_threads,
                    tf.config.threading.set_inter_op_parallelism_threads,
                ),
            ):
                current = int(getter())
                if count == 0 or count == current:
                    continue
                try:
                    setter(count)
                except RuntimeError:
                    logger.warning(
                        "model '%s': %s %d ignored; TensorFlow's pool is process-wide and fixed "
                        "once TensorFlow has started (now %s); set it on the first model loaded",
                        model,
                        key,
                        count,
                        current or "auto",
                    )
                else:
                    logger.info("model '%s': TensorFlow %s set to %d", model, key, count)


THREAD_POOLS = _ThreadPools()
