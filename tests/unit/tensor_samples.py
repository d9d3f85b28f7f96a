"""Sample tensors for the codec tests: client-side data of every Triton datatype."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from services.core import dtypes
from services.core.requests import Array

RNG = np.random.default_rng(7)

NUMERIC = [
    ("BOOL", np.bool_),
    ("INT8", np.int8),
    ("INT16", np.int16),
    ("INT32", np.int32),
    ("INT64", np.int64),
    ("UINT8", np.uint8),
    ("UINT16", np.uint16),
    ("UINT32", np.uint32),
    ("UINT64", np.uint64),
    ("FP16", np.float16),
    ("FP32", np.float32),
    ("FP64", np.float64),
]
ALL = [name for name, _ in NUMERIC] + ["BF16", "BYTES"]
STRINGS = [b"", b"hello", b"\xff\xfe\x00\x01", "héllo wörld".encode(), b"", b"x" * 300]


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> Array:
    """Client-side data (what a user hands to tritonclient) for ``datatype``."""
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([STRINGS[i % len(STRINGS)] for i in range(count)], dtype=object).reshape(
            shape
        )
    if datatype == "BF16":
        bf16: Array = (RNG.standard_normal(count) * 10).astype(ml_dtypes.bfloat16)
        return bf16.reshape(shape)
    if datatype == "BOOL":
        flags: Array = RNG.integers(0, 2, count) == 1
        return flags.reshape(shape)
    np_type = dict(NUMERIC)[datatype]
    if np.dtype(np_type).kind == "f":
        return (RNG.standard_normal(count) * 100).astype(np_type).reshape(shape)
    info = np.iinfo(np_type)
    values = [info.min, info.max, 0, 1, *RNG.integers(0, 100, max(count - 4, 0)).tolist()]
    return np.array(values[:count], dtype=np_type).reshape(shape)


def assert_same(decoded: Array, client: Array, datatype: str) -> None:
    assert decoded.shape == client.shape
    if datatype == "BF16":
        assert decoded.dtype == dtypes.BF16_DTYPE
        assert np.array_equal(decoded.view(np.uint16), client.view(np.uint16))
    elif datatype == "BYTES":
        assert decoded.dtype == object
        assert decoded.tolist() == client.tolist()
    else:
        assert decoded.dtype == client.dtype
        assert np.array_equal(decoded, client)
