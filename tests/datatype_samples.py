"""Edge values of every Triton datatype, for identity round trips (conformance suite, runtimes).

``edge_values(datatype)`` is client-side data of shape (2, 4), what a user hands to tritonclient
(BF16 as ``ml_dtypes.bfloat16``, BYTES as an object array of ``bytes``), holding the values a
codec or runtime most easily gets wrong: the type's extremes, zero and minus zero, infinities,
NaN with a payload, subnormals, empty, NUL-bearing and non-UTF-8 strings. ``kit_form`` turns it
into the serving kit's representation (BF16 as numpy "V2"); ``assert_identical`` compares bit
for bit, including the dtype.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from services.core import dtypes
from services.core.requests import Array

#: every Triton datatype, in the order of services/core/dtypes.py
ALL_DATATYPES = tuple(dtypes.BY_NAME)
SHAPE = (2, 4)

#: BF16 bit patterns: +0, -0, +inf, -inf / NaN with payload, smallest subnormal, max, ~1/3
_BF16_BITS = [[0x0000, 0x8000, 0x7F80, 0xFF80], [0x7FC1, 0x0001, 0x7F7F, 0x3EAB]]
_BYTES = [
    [b"", b"\x00", "h\u00e9llo w\u00f6rld".encode(), b"\xff\xfe\x00\x01"],
    [b"x" * 300, "\u65e5\u672c\u8a9e".encode(), b"a\x00b", b" "],
]
#: stands in for the non-UTF-8 element where a framework carries UTF-8 text only (ONNX)
_UTF8_ONLY = "\U0001f642".encode()


def _floats(np_type: type[np.floating]) -> Array:
    info = np.finfo(np_type)
    values = np.array(
        [[-0.0, np.inf, -np.inf, np.nan], [info.max, info.smallest_subnormal, info.min, 1 / 3]],
        dtype=np_type,
    )
    bits = values.view(f"u{values.itemsize}")
    bits[0, 3] |= 1  # a NaN payload: identity must keep the bits, not only "a NaN"
    return values


def _integers(np_type: type[np.integer]) -> Array:
    info = np.iinfo(np_type)
    if info.min == 0:
        rows = [[0, info.max, 1, 2], [info.max - 1, 42, 1 << (info.bits - 1), 7]]
    else:
        rows = [[info.min, info.max, 0, -1], [1, info.min + 1, info.max - 1, 42]]
    return np.array(rows, dtype=np_type)


def edge_values(datatype: str, utf8_only: bool = False) -> Array:
    """Client-side data of ``datatype`` (shape (2, 4)); ``utf8_only`` keeps BYTES valid UTF-8."""
    if datatype == "BOOL":
        return np.array([[True, False, True, True], [False, False, True, False]])
    if datatype == "BF16":
        bf16: Array = np.array(_BF16_BITS, dtype=np.uint16).view(ml_dtypes.bfloat16)
        return bf16
    if datatype == "BYTES":
        items = [
            [_UTF8_ONLY if utf8_only and not _is_utf8(b) else b for b in row] for row in _BYTES
        ]
        data = np.empty(SHAPE, dtype=object)
        data[:] = items
        return data
    np_type = dtypes.BY_NAME[datatype].numpy.type
    if issubclass(np_type, np.floating):
        return _floats(np_type)
    return _integers(np_type)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def json_safe(datatype: str, data: Array) -> bool:
    """Whether HTTP/REST can carry ``data`` as JSON exactly (no BF16, non-finite or non-UTF-8)."""
    if datatype == "BF16":
        return False
    if datatype == "BYTES":
        return all(_is_utf8(item) for item in data.flat)
    if data.dtype.kind == "f":
        return bool(np.all(np.isfinite(data)))
    return True


def kit_form(datatype: str, data: Array) -> Array:
    """Client-side data as the serving kit holds it (BF16 as raw "V2" values)."""
    if datatype == "BF16":
        return data.view(np.uint16).view(dtypes.BF16_DTYPE)
    return data


def assert_identical(got: Array, sent: Array, datatype: str) -> None:
    """``got`` has the dtype, shape and exact bits (BYTES: the exact bytes) of ``sent``."""
    assert got.shape == sent.shape, f"{datatype}: shape {got.shape}, sent {sent.shape}"
    assert got.dtype == sent.dtype, f"{datatype}: dtype {got.dtype}, sent {sent.dtype}"
    if datatype == "BYTES":
        assert got.tolist() == sent.tolist(), f"{datatype}: {got.tolist()} != {sent.tolist()}"
    else:
        assert got.tobytes() == sent.tobytes(), f"{datatype}: {got!r} != {sent!r}"
