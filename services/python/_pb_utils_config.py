"""pb_utils' model-config helpers: data types and lookups in a model's config.

Triton's ``inference.DataType`` enum values (``TYPE_FP32``, ...) and their conversions to and
from numpy types, and the lookups a ``model.py`` runs on ``json.loads(args["model_config"])``
(input/output entries by name, the decoupled transaction policy). Pure functions of their
arguments; services/python/triton_python_backend_utils.py re-exports every public name, so models
reach them as ``pb_utils.<name>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: Triton's ``inference.DataType`` enum values (model_config.proto)
TYPE_INVALID, TYPE_BOOL, TYPE_UINT8, TYPE_UINT16, TYPE_UINT32, TYPE_UINT64 = range(6)
TYPE_INT8, TYPE_INT16, TYPE_INT32, TYPE_INT64, TYPE_FP16, TYPE_FP32 = range(6, 12)
TYPE_FP64, TYPE_STRING, TYPE_BF16 = range(12, 15)

_NUMPY_BY_TRITON: dict[int, type[np.generic]] = {
    TYPE_BOOL: np.bool_,
    TYPE_UINT8: np.uint8,
    TYPE_UINT16: np.uint16,
    TYPE_UINT32: np.uint32,
    TYPE_UINT64: np.uint64,
    TYPE_INT8: np.int8,
    TYPE_INT16: np.int16,
    TYPE_INT32: np.int32,
    TYPE_INT64: np.int64,
    TYPE_FP16: np.float16,
    TYPE_FP32: np.float32,
    TYPE_FP64: np.float64,
    TYPE_STRING: np.object_,
}
_TRITON_BY_NAME: dict[str, int] = {
    "TYPE_BOOL": TYPE_BOOL,
    "TYPE_UINT8": TYPE_UINT8,
    "TYPE_UINT16": TYPE_UINT16,
    "TYPE_UINT32": TYPE_UINT32,
    "TYPE_UINT64": TYPE_UINT64,
    "TYPE_INT8": TYPE_INT8,
    "TYPE_INT16": TYPE_INT16,
    "TYPE_INT32": TYPE_INT32,
    "TYPE_INT64": TYPE_INT64,
    "TYPE_FP16": TYPE_FP16,
    "TYPE_FP32": TYPE_FP32,
    "TYPE_FP64": TYPE_FP64,
    "TYPE_STRING": TYPE_STRING,
}


def _config_by_name(model_config: Mapping[str, Any], key: str, name: str) -> dict[str, Any] | None:
    for entry in model_config.get(key, ()):
        if entry.get("name") == name:
            return dict(entry)
    return None


def get_input_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The config entry of input ``name`` in ``json.loads(args["model_config"])``, or None."""
    return _config_by_name(model_config, "input", name)


def get_output_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The config entry of output ``name`` in ``json.loads(args["model_config"])``, or None."""
    return _config_by_name(model_config, "output", name)


def using_decoupled_model_transaction_policy(model_config: Mapping[str, Any]) -> bool:
    """Whether the config asks for a decoupled model (responses sent by a response sender)."""
    policy = model_config.get("model_transaction_policy") or {}
    return bool(policy.get("decoupled", False))


def triton_to_numpy_type(data_type: int) -> type[np.generic] | None:
    """numpy type of a config DataType enum value (TYPE_FP32 → np.float32); None if none."""
    return _NUMPY_BY_TRITON.get(data_type)


def numpy_to_triton_type(data_type: Any) -> int | None:
    """Config DataType enum value of a numpy type (np.float32 → TYPE_FP32); None if none."""
    dtype = np.dtype(data_type)
    if dtype.kind in "OSU":
        return TYPE_STRING
    for triton_type, numpy_type in _NUMPY_BY_TRITON.items():
        if dtype == np.dtype(numpy_type):
            return triton_type
    return None


def triton_string_to_numpy(triton_type_string: str) -> type[np.generic] | None:
    """numpy type of a config data_type string ("TYPE_FP32" → np.float32); None if unknown."""
    triton_type = _TRITON_BY_NAME.get(triton_type_string)
    return None if triton_type is None else _NUMPY_BY_TRITON[triton_type]
