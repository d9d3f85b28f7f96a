"""Triton datatypes: wire strings ⇄ numpy dtypes ⇄ config ``DataType`` enum, and BYTES framing.

Used by the codecs (wire ⇄ numpy), by validation (request dtype vs config) and by runtimes that
need to know what a config datatype means in numpy.

Representation inside the server:
- fixed-size types are numpy arrays of the matching dtype (FP16 is ``np.float16``);
- BF16 has no numpy dtype, so it travels as ``np.dtype("V2")`` (the raw 16 bits, little-endian);
  on the wire BF16 exists only as raw bytes; ``arr.view(np.uint16)`` gives the bits as integers;
- BYTES are object arrays whose elements are ``bytes``; on the wire each element is a 4-byte
  little-endian length followed by its bytes, elements in C order.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import InvalidArgument
from services.core.requests import Array

BF16_DTYPE = np.dtype("V2")
BYTES_DTYPE = np.dtype(object)


@dataclass(frozen=True, slots=True)
class DataType:
    """One Triton datatype in all its spellings."""

    #: wire name ("FP32")
    name: str
    #: inference.DataType enum value in model configs (TYPE_FP32)
    config: int
    #: numpy dtype of the in-server representation
    numpy: np.dtype[Any]
    #: bytes per element; 0 for BYTES (variable size)
    byte_size: int


_ALL = (
    DataType("BOOL", mc.TYPE_BOOL, np.dtype(np.bool_), 1),
    DataType("UINT8", mc.TYPE_UINT8, np.dtype(np.uint8), 1),
    DataType("UINT16", mc.TYPE_UINT16, np.dtype(np.uint16), 2),
    DataType("UINT32", mc.TYPE_UINT32, np.dtype(np.uint32), 4),
    DataType("UINT64", mc.TYPE_UINT64, np.dtype(np.uint64), 8),
    DataType("INT8", mc.TYPE_INT8, np.dtype(np.int8), 1),
    DataType("INT16", mc.TYPE_INT16, np.dtype(np.int16), 2),
    DataType("INT32", mc.TYPE_INT32, np.dtype(np.int32), 4),
    DataType("INT64", mc.TYPE_INT64, np.dtype(np.int64), 8),
    DataType("FP16", mc.TYPE_FP16, np.dtype(np.float16), 2),
    DataType("FP32", mc.TYPE_FP32, np.dtype(np.float32), 4),
    DataType("FP64", mc.TYPE_FP64, np.dtype(np.float64), 8),
    DataType("BF16", mc.TYPE_BF16, BF16_DTYPE, 2),
    DataType("BYTES", mc.TYPE_STRING, BYTES_DTYPE, 0),
)

#: wire name → datatype
BY_NAME: dict[str, DataType] = {d.name: d for d in _ALL}
#: config enum value → datatype
BY_CONFIG: dict[int, DataType] = {d.config: d for d in _ALL}
#: numpy dtype → datatype (for the canonical in-server dtypes)
BY_NUMPY: dict[np.dtype[Any], DataType] = {d.numpy: d for d in _ALL}

_NAMES = ", ".join(BY_NAME)
_LENGTH = struct.Struct("<I")


def lookup(name: str, source: str) -> DataType:
    """The datatype spelled ``name`` on the wire; ``source`` names the tensor for the error."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown datatype '{name}' for {source}; expected one of {_NAMES}"
        ) from None


def from_config(data_type: int) -> DataType:
    """The datatype of a config ``data_type`` (TYPE_FP32 → FP32); ValueError for TYPE_INVALID."""
    try:
        return BY_CONFIG[data_type]
    except KeyError:
        raise ValueError(
            f"data_type {data_type} has no Triton datatype; use one of TYPE_BOOL, TYPE_INT8..64,"
            " TYPE_UINT8..64, TYPE_FP16, TYPE_FP32, TYPE_FP64, TYPE_BF16, TYPE_STRING"
        ) from None


def triton_from_config(data_type: int) -> str:
    """The wire name of a config ``data_type`` (TYPE_FP32 → "FP32", TYPE_STRING → "BYTES")."""
    return from_config(data_type).name


def numpy_from_config(data_type: int) -> np.dtype[Any]:
    """The in-server numpy dtype of a config ``data_type`` (TYPE_BF16 → V2, TYPE_STRING → O)."""
    return from_config(data_type).numpy


def name_of_numpy(dtype: np.dtype[Any]) -> str | None:
    """The Triton name of an in-server numpy dtype; string dtypes count as BYTES; None if none."""
    found = BY_NUMPY.get(dtype)
    if found is not None:
        return found.name
    if dtype.kind in "SU":
        return "BYTES"
    return None


def expected_byte_size(datatype: str, shape: Sequence[int]) -> int | None:
    """Bytes a tensor of ``datatype`` and ``shape`` takes on the wire; None for BYTES."""
    size = BY_NAME[datatype].byte_size
    if size == 0:
        return None
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * size


def serialize_bytes(arr: Array) -> bytes:
    """BYTES tensor → wire form: per element (C order) 4-byte little-endian length + bytes.

    Elements may be bytes-like or str (encoded as UTF-8); anything else is written as its str().
    """
    pack = _LENGTH.pack
    parts: list[bytes] = []
    for item in _elements(arr):
        parts.append(pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def _elements(arr: Array) -> Iterable[bytes]:
    # tolist() yields bytes for "S" arrays, str for "U" arrays and the objects themselves else
    items: list[object] = arr.ravel(order="C").tolist()
    return [_to_bytes(item) for item in items]


def _to_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str):
        return item.encode()
    return str(item).encode()


def deserialize_bytes(buf: bytes | memoryview, count: int, source: str) -> Array:
    """Wire form → flat object array of ``count`` bytes elements (the caller reshapes).

    Raises InvalidArgument, naming ``source`` (e.g. "input 'TEXT'"), when a length prefix is cut
    short, a length runs past the end, or the buffer holds more or fewer than ``count`` elements.
    """
    view = memoryview(buf).cast("B")
    total = len(view)
    out = np.empty(count, dtype=object)
    unpack = _LENGTH.unpack_from
    offset = 0
    for index in range(count):
        if offset + 4 > total:
            raise InvalidArgument(
                f"malformed BYTES data for {source}: the shape needs {count} elements but the data"
                f" ends after {index}; each element is a 4-byte little-endian length then its bytes"
            )
        (length,) = unpack(view, offset)
        offset += 4
        end = offset + length
        if end > total:
            raise InvalidArgument(
                f"malformed BYTES data for {source}: element {index} declares {length} bytes but"
                f" only {total - offset} remain; check the 4-byte little-endian length prefixes"
            )
        out[index] = bytes(view[offset:end])
        offset = end
    if offset != total:
        raise InvalidArgument(
            f"malformed BYTES data for {source}: {total - offset} bytes left over after the"
            f" {count} elements the shape asks for; send exactly one length-prefixed item per"
            " element"
        )
    return out


def float32_to_bf16(values: Array) -> Array:
    """Round float32 values to the nearest BF16 (ties to even) and return them as V2 raw bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0
    return rounded.view(BF16_DTYPE)


def to_wire_array(datatype: str, data: Array) -> Array:
    """``data`` as a C-contiguous array of ``datatype``'s canonical dtype (no copy when it is)."""
    target = BY_NAME[datatype].numpy
    if data.dtype == target:
        return np.ascontiguousarray(data)
    if target == BF16_DTYPE:
        if data.dtype.itemsize == 2 and data.dtype.kind in "iuV":
            return np.ascontiguousarray(data).view(BF16_DTYPE)
        return float32_to_bf16(data)
    return np.ascontiguousarray(data, dtype=target)


def tensor_bytes(datatype: str, data: Array) -> bytes:
    """The wire bytes of a tensor: length-prefixed elements for BYTES, else raw little-endian."""
    if datatype == "BYTES":
        return serialize_bytes(data)
    return to_wire_array(datatype, data).tobytes()
