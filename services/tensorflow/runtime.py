"""The TensorFlow runtime: one loaded SavedModel signature per model instance.

The model manager (services/core) creates one TensorflowRuntime per instance of a model version
whose config names platform "tensorflow_savedmodel" or backend "tensorflow" (or, with no config,
whose version directory holds ``model.savedmodel/``); the scheduler calls ``infer`` with whole
batches from a worker thread, and TensorFlow releases the GIL while its kernels run.

Loading: ``tf.saved_model.load(dir, tags=[TF_GRAPH_TAG])`` and the signature named by the
``TF_SIGNATURE_DEF`` parameter (default ``serving_default``); see services/tensorflow/options.py.
Config input names are the signature's input keys and output names its structured output keys,
as in Triton; auto-complete fills them from the signature (services/tensorflow/autocomplete.py).
Each batch runs the signature's concrete function on eager tensors made from the kit's numpy
arrays (BYTES as ``tf.string``) and returns the outputs' ``.numpy()`` values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tensorflow as tf  # type: ignore[import-untyped]  # no py.typed in tensorflow

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import InternalError, InvalidArgument, ModelLoadError, Unavailable
from services.core.requests import Array
from services.core.runtime import InstanceSpec, Runtime
from services.tensorflow import autocomplete as ac
from services.tensorflow.options import THREAD_POOLS, check_device, plan_load
from services.tensorflow.signature import (
    CONFIG_TO_TF,
    call_signature,
    read_signature,
    to_numpy,
    to_tf,
)

logger = logging.getLogger(__name__)


def _reason(exc: BaseException) -> str:
    """The first line of TensorFlow's message (without the op trace that follows it)."""
    text = getattr(exc, "message", None) or str(exc)
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class TensorflowRuntime(Runtime):
    """Serves TensorFlow SavedModels on the CPU (tensorflow-cpu)."""

    backend: ClassVar[str] = ac.BACKEND
    platforms: ClassVar[tuple[str, ...]] = (ac.PLATFORM,)
    default_model_filename: ClassVar[str] = "model.savedmodel"

    @classmethod
    def autocomplete(cls, config: mc.ModelConfig, model_path: Path) -> None:
        """Fill inputs, outputs, max_batch_size, platform/backend from the chosen signature."""
        plan = plan_load(config)
        ac.complete_config(
            config, read_signature(config.name, model_path, plan.tag, plan.signature)
        )

    def __init__(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> None:
        self.name = config.name
        plan = plan_load(config)
        signature = read_signature(self.name, model_path, plan.tag, plan.signature)
        ac.check_config(config, signature)
        THREAD_POOLS.apply(self.name, plan)
        check_device(self.name, instance)
        try:
            loaded = tf.saved_model.load(str(model_path), tags=[plan.tag])
            function = loaded.signatures[plan.signature]
        except Exception as exc:
            raise ModelLoadError(
                f"model '{self.name}': TensorFlow cannot load signature '{plan.signature}' of "
                f"{model_path}: {_reason(exc)}; check that it was written by "
                "tf.saved_model.save with this TensorFlow version or an older one"
            ) from exc
        self._loaded: Any = loaded
        self._function: Any = function
        self.signature = signature
        self._input_types = {io.name: CONFIG_TO_TF[io.data_type] for io in config.input}
        self._output_names = [io.name for io in config.output]
        logger.info(
            "loaded model '%s' instance %s from %s (signature '%s')",
            self.name,
            instance.name,
            model_path,
            plan.signature,
        )

    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        function = self._function
        if function is None:
            raise Unavailable(f"model '{self.name}' instance is unloaded")
        feed = {name: to_tf(array, self._input_types[name]) for name, array in inputs.items()}
        try:
            result = call_signature(function, feed)
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidArgument(
                f"model '{self.name}': TensorFlow rejected the inputs: {_reason(exc)}"
            ) from exc
        except Exception as exc:
            raise InternalError(
                f"model '{self.name}' failed while running: {_reason(exc)}"
            ) from exc
        names = list(outputs) if outputs else self._output_names
        missing = [name for name in names if name not in result]
        if missing:
            raise InternalError(
                f"model '{self.name}': signature '{self.signature.name}' returned no "
                f"{missing} (it returned {sorted(result)})"
            )
        return {name: to_numpy(result[name]) for name in names}

    def unload(self) -> None:
        self._function = None
        self._loaded = None
