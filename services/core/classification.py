"""Top-k classification of an output tensor, as Triton returns it when a request asks for it.

After a batch returns, the data plane replaces every output requested with the
``classification`` parameter by ``classify(...)``: a BYTES tensor of "value:index" or
"value:index:label" strings, the k largest values of each batch item in descending order.
Labels come from the output's ``label_filename`` (one label per line, in the model directory),
read once per model with ``load_labels``.

Formatting follows Triton: floating-point values with six decimals ("0.750000"), integers as
plain decimals; a class index past the end of the label file (or an empty label) gets no label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.core.errors import InvalidArgument, ModelLoadError
from services.core.requests import Array


def load_labels(path: Path) -> list[str]:
    """The labels in ``path``, one per line (line i labels class index i)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelLoadError(
            f"label file {path} not found; put the file named by label_filename in the model"
            " directory, or remove label_filename from the output's config"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read label file {path}: {exc}; make it UTF-8 text") from exc
    return text.splitlines()


def classify(data: Array, k: int, labels: Sequence[str] | None, batched: bool) -> Array:
    """Top-``k`` classes of ``data``: object array of bytes, shape [batch, n] or [n].

    With ``batched`` the first dimension is the batch and each item is classified over all of
    its remaining elements; otherwise the whole tensor is one item. n = min(k, item size).
    """
    if k < 1:
        raise InvalidArgument(f"classification count must be at least 1, got {k}")
    numeric = data.dtype.kind in "iu" or (data.dtype.kind == "f" and data.dtype.itemsize >= 4)
    if not numeric:
        raise InvalidArgument(
            f"classification is not available for data of type {data.dtype}; it needs an"
            " integer, FP32 or FP64 output"
        )
    per_batch = batched and data.ndim > 0
    rows = data.shape[0] if per_batch else 1
    width = math.prod(data.shape[1:] if per_batch else data.shape)
    items = data.reshape(rows, width)
    count = min(k, width)
    result = np.empty((items.shape[0], count), dtype=object)
    floating = data.dtype.kind == "f"
    for row_index, row in enumerate(items):
        for column, index in enumerate(_top_indices(row, count)):
            value = row[index]
            text = f"{float(value):f}" if floating else str(int(value))
            entry = f"{text}:{index}"
            if labels is not None and index < len(labels) and labels[index]:
                entry = f"{entry}:{labels[index]}"
            result[row_index, column] = entry.encode()
    return result if per_batch else result.reshape(count)


def _top_indices(row: Array, count: int) -> list[int]:
    """Indices of the ``count`` largest values, largest first; ties keep index order."""
    width = row.shape[0]
    # stable ascending sort of the reversed row, read backwards: descending, ties by index
    order = np.argsort(row[::-1], kind="stable")[::-1][:count]
    return [int(width - 1 - i) for i in order]
