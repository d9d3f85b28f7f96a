"""TensorFlow frozen graphs: ``platform: "tensorflow_graphdef"`` with ``model.graphdef``.

A frozen GraphDef (TensorFlow 1 style: variables folded into constants) has no signature, so,
as in Triton, its config is not auto-completed: every input and output is declared, named after
a tensor of the graph (``name`` or ``name:0``). Loading checks each against the graph (it exists;
an input is a Placeholder; datatypes agree; ranks agree where the graph knows them), then prunes
the imported graph to a function from the inputs, in config order, to the outputs. Thread pools
and devices follow the SavedModel runtime's rules (services/tensorflow/options.py).
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
from services.tensorflow.autocomplete import BACKEND
from services.tensorflow.options import THREAD_POOLS, check_device, plan_load
from services.tensorflow.signature import CONFIG_TO_TF, TF_TO_CONFIG, to_numpy, to_tf

logger = logging.getLogger(__name__)

PLATFORM = "tensorflow_graphdef"


def tensor_name(name: str) -> str:
    """The graph tensor a config name refers to (``x`` → ``x:0``)."""
    return name if ":" in name else f"{name}:0"


def read_graph(model: str, path: Path) -> Any:
    """The GraphDef in ``path``; ModelLoadError when it is not one."""
    try:
        return tf.compat.v1.GraphDef.FromString(path.read_bytes())
    except Exception as exc:
        raise ModelLoadError(
            f"model '{model}': {path} is not a TensorFlow GraphDef ({type(exc).__name__}); "
            "write it with graph_def.SerializeToString() after freezing the variables"
        ) from exc


def _first_problem(config: mc.ModelConfig, graph: Any) -> str | None:
    """What in the config does not match the graph (None: it matches)."""
    if not config.input or not config.output:
        return (
            "a tensorflow_graphdef config must declare its inputs and outputs (a frozen graph has "
            "no signature to complete them from), named after the graph's tensors"
        )
    batch = 1 if config.max_batch_size > 0 else 0
    for kind, entries in (("input", config.input), ("output", config.output)):
        for io in entries:
            try:
                tensor = graph.get_tensor_by_name(tensor_name(io.name))
            except (KeyError, ValueError):
                return f"{kind} '{io.name}' is not a tensor of the graph"
            if kind == "input" and tensor.op.type != "Placeholder":
                return f"input '{io.name}' is a {tensor.op.type}, not a Placeholder of the graph"
            declared = TF_TO_CONFIG.get(tensor.dtype.base_dtype)
            if declared != io.data_type:
                have = mc.DataType.Name(declared) if declared is not None else tensor.dtype.name
                return (
                    f"{kind} '{io.name}' is {have} in the graph but "
                    f"{mc.DataType.Name(io.data_type)} in the config"
                )
            rank = tensor.shape.rank
            dims = list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)
            if rank is not None and rank != len(dims) + batch:
                return (
                    f"{kind} '{io.name}' has rank {rank} in the graph but the config gives "
                    f"{len(dims) + batch} (dims {dims}"
                    + (" plus the batch dimension)" if batch else ")")
                )
    return None


class TensorflowGraphdefRuntime(Runtime):
    """Serves frozen TensorFlow GraphDefs on the CPU."""

    backend: ClassVar[str] = BACKEND
    platforms: ClassVar[tuple[str, ...]] = (PLATFORM,)
    default_model_filename: ClassVar[str] = "model.graphdef"

    def __init__(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> None:
        self.name = config.name
        plan = plan_load(config)
        graph_def = read_graph(self.name, model_path)
        THREAD_POOLS.apply(self.name, plan)
        check_device(self.name, instance)
        try:
            wrapped = tf.compat.v1.wrap_function(
                lambda: tf.compat.v1.import_graph_def(graph_def, name=""), []
            )
        except Exception as exc:
            raise ModelLoadError(
                f"model '{self.name}': TensorFlow cannot import the graph in {model_path}: {exc}"
            ) from exc
        problem = _first_problem(config, wrapped.graph)
        if problem:
            raise ModelLoadError(f"model '{self.name}': {problem}")
        graph = wrapped.graph
        fetches = {io.name: graph.get_tensor_by_name(tensor_name(io.name)) for io in config.output}
        self._input_names = [io.name for io in config.input]
        self._input_types = [CONFIG_TO_TF[io.data_type] for io in config.input]
        self._function: Any = wrapped.prune(
            feeds=[graph.get_tensor_by_name(tensor_name(n)) for n in self._input_names],
            fetches=fetches,
        )
        logger.info(
            "loaded model '%s' instance %s from %s (frozen graph, %d nodes)",
            self.name,
            instance.name,
            model_path,
            len(graph_def.node),
        )

    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        function = self._function
        if function is None:
            raise Unavailable(f"model '{self.name}' instance is unloaded")
        feed = [
            to_tf(inputs[name], dtype)
            for name, dtype in zip(self._input_names, self._input_types, strict=True)
        ]
        try:
            result = function(*feed)
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidArgument(
                f"model '{self.name}': TensorFlow rejected the inputs: {exc.message}"
            ) from exc
        except Exception as exc:
            raise InternalError(f"model '{self.name}' failed while running: {exc}") from exc
        return {name: to_numpy(result[name]) for name in outputs}

    def unload(self) -> None:
        self._function = None
