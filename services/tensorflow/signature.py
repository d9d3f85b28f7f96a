"""SavedModel signatures and tensors: what a signature declares, and numpy ⇄ TensorFlow on the way.

Used by services/tensorflow/autocomplete.py (to fill a config) and runtime.py (to check a config
against the model, and on every batch). A signature is read from the directory's
``saved_model.pb`` protobuf without loading variables or running anything, so auto-complete stays
cheap. Datatypes: every Triton datatype, BYTES as ``tf.string`` (object arrays of ``bytes`` in the
kit) and BF16 as ``tf.bfloat16``, reinterpreted bit for bit from and to the kit's raw 16-bit
values (numpy dtype "V2") with ``tf.bitcast``, never converted through float. A signature tensor
of any other TensorFlow type is refused with a message naming the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# tensorflow ships no type information (no py.typed): its objects are Any here
import tensorflow as tf  # type: ignore[import-untyped]
from tensorflow.core.protobuf import saved_model_pb2  # type: ignore[import-untyped]

from protos.gen.inference import model_config_pb2 as mc
from services.core.dtypes import BF16_DTYPE
from services.core.errors import ModelLoadError
from services.core.requests import Array

SAVED_MODEL_PB = "saved_model.pb"

#: TensorFlow dtype → config datatype, for every datatype this family can exchange
TF_TO_CONFIG: dict[Any, int] = {
    tf.bool: mc.TYPE_BOOL,
    tf.uint8: mc.TYPE_UINT8,
    tf.uint16: mc.TYPE_UINT16,
    tf.uint32: mc.TYPE_UINT32,
    tf.uint64: mc.TYPE_UINT64,
    tf.int8: mc.TYPE_INT8,
    tf.int16: mc.TYPE_INT16,
    tf.int32: mc.TYPE_INT32,
    tf.int64: mc.TYPE_INT64,
    tf.float16: mc.TYPE_FP16,
    tf.float32: mc.TYPE_FP32,
    tf.float64: mc.TYPE_FP64,
    tf.bfloat16: mc.TYPE_BF16,
    tf.string: mc.TYPE_STRING,
}
CONFIG_TO_TF: dict[int, Any] = {v: k for k, v in TF_TO_CONFIG.items()}


@dataclass(frozen=True, slots=True)
class SignatureTensor:
    """One input or output of a signature: its key, TensorFlow dtype name and shape.

    ``shape`` is None for unknown rank; unknown dimensions are -1.
    """

    name: str
    tf_type: str
    data_type: int
    shape: tuple[int, ...] | None

    @property
    def batchable(self) -> bool:
        """True when the first dimension is dynamic (None in the signature)."""
        return bool(self.shape) and self.shape is not None and self.shape[0] < 0

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def dims(self, batching: bool) -> list[int]:
        shape = list(self.shape or ())
        return shape[1:] if batching else shape


@dataclass(frozen=True, slots=True)
class Signature:
    """The inputs and outputs of one signature, each sorted by key."""

    name: str
    inputs: tuple[SignatureTensor, ...]
    outputs: tuple[SignatureTensor, ...]


def _tensor(key: str, info: Any) -> SignatureTensor:
    dtype = tf.dtypes.as_dtype(info.dtype)
    shape_proto = info.tensor_shape
    shape = None if shape_proto.unknown_rank else tuple(int(d.size) for d in shape_proto.dim)
    data_type = TF_TO_CONFIG.get(dtype, mc.TYPE_INVALID)
    return SignatureTensor(key, dtype.name, data_type, shape)


def _meta_graph(model: str, path: Path, tag: str) -> Any:
    pb = path / SAVED_MODEL_PB
    if not path.is_dir() or not pb.is_file():
        raise ModelLoadError(
            f"model '{model}': {path} is not a SavedModel directory (no {SAVED_MODEL_PB} in it); "
            "write the model with tf.saved_model.save(module, path) into the version directory "
            "as model.savedmodel/, or set default_model_filename to its directory name"
        )
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(pb.read_bytes())
    except Exception as exc:
        raise ModelLoadError(
            f"model '{model}': {pb} is not a SavedModel protobuf ({exc}); write the model with "
            "tf.saved_model.save"
        ) from exc
    tag_sets = [sorted(m.meta_info_def.tags) for m in saved.meta_graphs]
    for meta_graph in saved.meta_graphs:
        if tag in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ModelLoadError(
        f"model '{model}': {path.name} has no graph tagged '{tag}' (its tag sets: {tag_sets}); "
        "set parameter TF_GRAPH_TAG to one of them"
    )


def read_signature(model: str, path: Path, tag: str, signature: str) -> Signature:
    """The signature ``signature`` of the graph tagged ``tag`` in SavedModel directory ``path``."""
    meta_graph = _meta_graph(model, path, tag)
    signatures = meta_graph.signature_def
    if signature not in signatures:
        raise ModelLoadError(
            f"model '{model}': {path.name} has no signature '{signature}' (its signatures: "
            f"{sorted(signatures)}); set parameter TF_SIGNATURE_DEF to one of them"
        )
    sig = signatures[signature]
    return Signature(
        signature,
        tuple(_tensor(key, sig.inputs[key]) for key in sorted(sig.inputs)),
        tuple(_tensor(key, sig.outputs[key]) for key in sorted(sig.outputs)),
    )


def unsupported_reason(tensor: SignatureTensor) -> str | None:
    """Why the service cannot exchange this tensor, or None when it can."""
    if tensor.data_type != mc.TYPE_INVALID:
        return None
    supported = ", ".join(sorted(dt.name for dt in TF_TO_CONFIG))
    return (
        f"of TensorFlow type {tensor.tf_type}, which the tensorflow service cannot exchange; "
        f"cast it in the signature to one of {supported}"
    )


def to_tf(array: Array, dtype: Any) -> Any:
    """A kit array as an eager tensor of ``dtype`` (BYTES: object array of bytes → tf.string;
    BF16: the raw bits of a "V2" array reinterpreted as tf.bfloat16)."""
    if array.dtype == BF16_DTYPE:
        return tf.bitcast(tf.convert_to_tensor(array.view(np.uint16)), tf.bfloat16)
    return tf.convert_to_tensor(array, dtype=dtype)


def to_numpy(tensor: Any) -> Array:
    """An eager result as a kit array; tf.string gives an object array of ``bytes``, tf.bfloat16
    a "V2" array of the raw bits."""
    if tensor.dtype == tf.bfloat16:
        bits: Array = np.asarray(tf.bitcast(tensor, tf.uint16).numpy())
        return bits.view(BF16_DTYPE)
    value = tensor.numpy()
    if isinstance(value, bytes):
        return np.array([value], dtype=object).reshape(())
    result: Array = np.asarray(value)
    return result


def call_signature(function: Any, feed: Mapping[str, Any]) -> Mapping[str, Any]:
    """Run a signature's concrete function with keyword tensors; its structured outputs."""
    result: Mapping[str, Any] = function(**feed)
    return result
