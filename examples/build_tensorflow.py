"""Build the TensorFlow example models from code: SavedModel twins of the ONNX and torch ones.

``python -m examples.build_tensorflow <dir>`` writes Triton-layout models served by
services/tensorflow (``<dir>/<name>/1/model.savedmodel/``):

- ``simple_tf``: INT32 INPUT0/INPUT1 [16] → OUTPUT0 sum, OUTPUT1 difference (Triton's ``simple``);
  a second signature ``swapped`` gives OUTPUT1 = INPUT1 - INPUT0, chosen with the
  ``TF_SIGNATURE_DEF`` parameter;
- ``mlp_tf``: FP32 INPUT0 [256] → 1024 → 1024 → 10 OUTPUT0, ReLU between, max_batch_size 64 with
  dynamic batching;
- ``simple_tf_auto``: the ``simple_tf`` SavedModel with NO config.pbtxt, so the service
  auto-completes its config from the signature (max_batch_size 4, dynamic batching);
- ``simple_tf_graphdef``: ``simple_tf`` as a frozen GraphDef (``1/model.graphdef``, platform
  ``tensorflow_graphdef``; Placeholders INPUT0/INPUT1, Identity ops OUTPUT0/OUTPUT1);
- ``dtypes_tf``: identity per datatype for the conformance suite: signature input
  ``IN_<DTYPE>`` [-1] → output ``OUT_<DTYPE>`` (``tf.identity``) for all 14 Triton datatypes
  (BYTES as tf.string, BF16 as tf.bfloat16), max_batch_size 8;
- ``simple_sequence_tf``: the stateful accumulator (Triton's ``simple_sequence``, served by the
  sequence batcher): INT32 INPUT [1] → OUTPUT, the running sum of the sequence; signature
  ``serving_default`` takes INPUT, the control inputs START and READY and the state ACC_IN, and
  returns OUTPUT and the state ACC_OUT, max_batch_size 8;
- ``simple_ragged_tf``: ragged batching: FP32 INPUT [-1] of any length per request → SUM per
  request and SCALED, the values doubled; the signature takes the batch's values as one 1-D run
  and OFFSETS, where each request starts and ends, which the server makes
  (BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO: one pair per request, so requests of batch 1).

Weights come from fixed seeds (numpy), so every build computes the same numbers; ``mlp_weights()``
returns them for tests to compare against. A model directory is written next to its final place
and swapped in, so a reader never sees half a SavedModel.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from examples.cli import builder_main, config_type
from examples.ragged_config import ragged_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # type: ignore[import-untyped]  # no py.typed

SEED = 20261121
MAX_BATCH = 64
SAVEDMODEL_DIR = "model.savedmodel"
GRAPHDEF_FILE = "model.graphdef"
MLP_SIZES = (256, 1024, 1024, 10)
#: one dense layer: kernel [in, out] and bias [out]
Layer = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]

#: writes a SavedModel into the given directory and returns the model's config.pbtxt (or None)
Builder = Callable[[Path], "str | None"]


def mlp_weights(seed: int = SEED) -> list[Layer]:
    """(kernel [in, out], bias [out]) per layer, FP32, He-style scale, from a fixed seed."""
    rng = np.random.default_rng(seed)
    layers: list[Layer] = []
    for n_in, n_out in itertools.pairwise(MLP_SIZES):
        kernel = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        bias = (rng.standard_normal(n_out) * 0.01).astype(np.float32)
        layers.append((kernel, bias))
    return layers


def mlp_reference(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The MLP in numpy (float64 accumulation), for tests to compare the served model against."""
    h = x.astype(np.float64)
    layers = mlp_weights()
    for i, (kernel, bias) in enumerate(layers):
        h = h @ kernel + bias
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h.astype(np.float32)


class _Mlp(tf.Module):  # type: ignore[misc]  # tf.Module is untyped (Any)
    def __init__(self) -> None:
        super().__init__()
        self.layers = [(tf.Variable(k), tf.Variable(b)) for k, b in mlp_weights()]

    _spec = tf.TensorSpec([None, MLP_SIZES[0]], tf.float32)

    @tf.function(input_signature=[_spec])  # type: ignore[untyped-decorator]  # untyped in TF
    def serve(self, INPUT0: Any) -> dict[str, Any]:  # noqa: N803 - the signature key
        h = INPUT0
        for i, (kernel, bias) in enumerate(self.layers):
            h = tf.matmul(h, kernel) + bias
            if i < len(self.layers) - 1:
                h = tf.nn.relu(h)
        return {"OUTPUT0": h}


class _Simple(tf.Module):  # type: ignore[misc]  # tf.Module is untyped (Any)
    _spec = tf.TensorSpec([None, 16], tf.int32)

    @tf.function(input_signature=[_spec, _spec])  # type: ignore[untyped-decorator]  # untyped in TF
    def serve(self, INPUT0: Any, INPUT1: Any) -> dict[str, Any]:  # noqa: N803 - signature keys
        return {"OUTPUT0": INPUT0 + INPUT1, "OUTPUT1": INPUT0 - INPUT1}

    @tf.function(input_signature=[_spec, _spec])  # type: ignore[untyped-decorator]  # untyped in TF
    def swapped(self, INPUT0: Any, INPUT1: Any) -> dict[str, Any]:  # noqa: N803
        return {"OUTPUT0": INPUT0 + INPUT1, "OUTPUT1": INPUT1 - INPUT0}


class _Sequence(tf.Module):  # type: ignore[misc]  # tf.Module is untyped (Any)
    """The running sum of a sequence: the server feeds START and READY (0 / 1) and the state
    ACC_IN (ACC_OUT of the sequence's previous request; zeros at START)."""

    _spec = tf.TensorSpec([None, 1], tf.int32)

    @tf.function(input_signature=[_spec] * 4)  # type: ignore[untyped-decorator]  # untyped in TF
    def serve(self, INPUT: Any, START: Any, READY: Any, ACC_IN: Any) -> dict[str, Any]:  # noqa: N803
        acc_out = INPUT * READY + ACC_IN * (1 - START)
        return {"OUTPUT": tf.identity(acc_out), "ACC_OUT": acc_out}


class _RaggedSum(tf.Module):  # type: ignore[misc]  # tf.Module is untyped (Any)
    """Per request, the sum of its slice of the flat INPUT (prefix sums at OFFSETS), and the
    values doubled."""

    _specs = [tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.int32)]

    @tf.function(input_signature=_specs)  # type: ignore[untyped-decorator]  # untyped in TF
    def serve(self, INPUT: Any, OFFSETS: Any) -> dict[str, Any]:  # noqa: N803 - signature keys
        prefix = tf.concat([[0.0], tf.cumsum(INPUT)], axis=0)
        sums = tf.gather(prefix, OFFSETS[1:]) - tf.gather(prefix, OFFSETS[:-1])
        return {"SUM": tf.expand_dims(sums, 1), "SCALED": INPUT * 2}


#: simple_ragged_tf's (values, batch input, sum, scaled): the signature's keys
RAGGED_NAMES = ("INPUT", "OFFSETS", "SUM", "SCALED")


#: Triton datatype → TensorFlow dtype, for every datatype of ``dtypes_tf``
DTYPES_TF_TYPES: dict[str, Any] = {
    "BOOL": tf.bool,
    "UINT8": tf.uint8,
    "UINT16": tf.uint16,
    "UINT32": tf.uint32,
    "UINT64": tf.uint64,
    "INT8": tf.int8,
    "INT16": tf.int16,
    "INT32": tf.int32,
    "INT64": tf.int64,
    "FP16": tf.float16,
    "FP32": tf.float32,
    "FP64": tf.float64,
    "BF16": tf.bfloat16,
    "BYTES": tf.string,
}
DTYPES_DATATYPES = tuple(DTYPES_TF_TYPES)


class _Dtypes(tf.Module):  # type: ignore[misc]  # tf.Module is untyped (Any)
    """One signature taking a dict of named specs: the names become the signature's input keys."""

    _specs = {
        f"IN_{d}": tf.TensorSpec([None, None], t, name=f"IN_{d}")
        for d, t in DTYPES_TF_TYPES.items()
    }

    @tf.function(input_signature=[_specs])  # type: ignore[untyped-decorator]  # untyped in TF
    def serve(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {f"OUT_{key[3:]}": tf.identity(value) for key, value in inputs.items()}


def _io(name: str, type_name: str, dims: Sequence[int]) -> str:
    dim_text = ", ".join(str(d) for d in dims)
    return f'  {{\n    name: "{name}"\n    data_type: {type_name}\n    dims: [ {dim_text} ]\n  }}'


def _config(
    name: str, inputs: Sequence[str], outputs: Sequence[str], max_batch: int, delay_us: int
) -> str:
    return (
        f'name: "{name}"\nplatform: "tensorflow_savedmodel"\nmax_batch_size: {max_batch}\n'
        "input [\n" + ",\n".join(inputs) + "\n]\n"
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n}}\n"
    )


def _save_simple(path: Path) -> None:
    module = _Simple()
    signatures = {"serving_default": module.serve, "swapped": module.swapped}
    tf.saved_model.save(module, str(path), signatures=signatures)


def build_simple(path: Path) -> str:
    """INT32 INPUT0/INPUT1 [16] → OUTPUT0 = sum, OUTPUT1 = difference; returns its config."""
    _save_simple(path)
    inputs = [_io(f"INPUT{i}", "TYPE_INT32", [16]) for i in range(2)]
    outputs = [_io(f"OUTPUT{i}", "TYPE_INT32", [16]) for i in range(2)]
    return _config("simple_tf", inputs, outputs, 8, 0)


def build_simple_auto(path: Path) -> None:
    """The simple SavedModel without a config: the service auto-completes it."""
    _save_simple(path)


def build_mlp(path: Path) -> str:
    """The MLP with a dynamic batch dimension; returns its config (max_batch_size 64)."""
    module = _Mlp()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    inputs = [_io("INPUT0", "TYPE_FP32", [MLP_SIZES[0]])]
    outputs = [_io("OUTPUT0", "TYPE_FP32", [MLP_SIZES[-1]])]
    return _config("mlp_tf", inputs, outputs, MAX_BATCH, 100)


def build_dtypes(path: Path) -> str:
    """IN_<DTYPE> [-1] → OUT_<DTYPE> unchanged for every datatype; returns its config."""
    module = _Dtypes()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    inputs = [_io(f"IN_{d}", config_type(d), [-1]) for d in DTYPES_DATATYPES]
    outputs = [_io(f"OUT_{d}", config_type(d), [-1]) for d in DTYPES_DATATYPES]
    return _config("dtypes_tf", inputs, outputs, 8, 0)


SEQUENCE_CONFIG = """name: "simple_sequence_tf"
platform: "tensorflow_savedmodel"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] }
  ]
  state [ { input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
}
"""


def build_sequence(path: Path) -> str:
    """The stateful accumulator: INPUT → OUTPUT, the sum of the sequence's INPUTs so far."""
    module = _Sequence()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return SEQUENCE_CONFIG


def build_ragged(path: Path) -> str:
    """Ragged batching: INPUT of any length → SUM per request, SCALED (see _RaggedSum)."""
    module = _RaggedSum()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return ragged_config(
        "simple_ragged_tf",
        "tensorflow_savedmodel",
        "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO",
        RAGGED_NAMES,
    )


def build_simple_graphdef(path: Path) -> str:
    """The simple model as a frozen GraphDef (``model.graphdef`` beside where a SavedModel would
    go): Placeholders INPUT0/INPUT1, Identity ops OUTPUT0/OUTPUT1; returns its config."""
    from tensorflow.python.framework.convert_to_constants import (  # type: ignore[import-untyped]
        convert_variables_to_constants_v2,
    )

    specs = [tf.TensorSpec([None, 16], tf.int32, name=f"INPUT{i}") for i in range(2)]

    @tf.function(input_signature=specs)  # type: ignore[untyped-decorator]  # untyped in TF
    def simple(a: Any, b: Any) -> list[Any]:
        return [tf.identity(a + b, name="OUTPUT0"), tf.identity(a - b, name="OUTPUT1")]

    concrete = simple.get_concrete_function()
    graph_def = convert_variables_to_constants_v2(concrete).graph.as_graph_def()
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / GRAPHDEF_FILE).write_bytes(graph_def.SerializeToString())
    inputs = [_io(f"INPUT{i}", "TYPE_INT32", [16]) for i in range(2)]
    outputs = [_io(f"OUTPUT{i}", "TYPE_INT32", [16]) for i in range(2)]
    return _config("simple_tf_graphdef", inputs, outputs, 8, 0).replace(
        'platform: "tensorflow_savedmodel"', 'platform: "tensorflow_graphdef"'
    )


BUILDERS: dict[str, Builder] = {
    "simple_tf": build_simple,
    "simple_tf_graphdef": build_simple_graphdef,
    "mlp_tf": build_mlp,
    "simple_tf_auto": build_simple_auto,
    "dtypes_tf": build_dtypes,
    "simple_sequence_tf": build_sequence,
    "simple_ragged_tf": build_ragged,
}


def write_model(root: Path, name: str, builder: Builder) -> None:
    """Write one model directory (config.pbtxt when the builder gives one, 1/model.savedmodel/).

    The new directory is built beside the old one and swapped in with renames.
    """
    model_dir = root / name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        config = builder(staging / "1" / SAVEDMODEL_DIR)
        if config is not None:
            (staging / "config.pbtxt").write_text(config)
        old = root / f".{name}.old"
        if model_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            model_dir.rename(old)
        staging.rename(model_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_tensorflow_repository(root: Path, names: Iterable[str] | None = None) -> None:
    """Build the named TensorFlow example models (all when ``names`` is None) under ``root``."""
    wanted = list(BUILDERS) if names is None else list(names)
    unknown = [n for n in wanted if n not in BUILDERS]
    if unknown:
        raise ValueError(
            f"unknown tensorflow example model(s) {unknown}; choose from {sorted(BUILDERS)}"
        )
    for name in wanted:
        write_model(root, name, BUILDERS[name])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build these examples into a repository directory."""
    return builder_main(
        argv,
        prog="python -m examples.build_tensorflow",
        description="Build the TensorFlow example models (SavedModel).",
        names=BUILDERS,
        build=build_tensorflow_repository,
        label="tensorflow example models",
    )


if __name__ == "__main__":
    sys.exit(main())
