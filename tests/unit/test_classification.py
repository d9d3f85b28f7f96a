"""Top-k classification strings, as Triton formats them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.core.classification import classify, load_labels
from services.core.errors import InvalidArgument, ModelLoadError


def test_batched_float_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n\nbird\n", encoding="utf-8")
    labels = load_labels(path)
    assert labels == ["cat", "dog", "", "bird"]
    data = np.array([[0.1, 0.7, 0.15, 0.05, 0.0], [0.9, 0.0, 0.05, 0.05, 0.0]], dtype=np.float32)
    result = classify(data, 3, labels, batched=True)
    assert result.shape == (2, 3)
    assert result.tolist() == [
        [b"0.700000:1:dog", b"0.150000:2", b"0.100000:0:cat"],
        [b"0.900000:0:cat", b"0.050000:2", b"0.050000:3:bird"],
    ]


def test_unbatched_integers_k_larger_than_classes() -> None:
    data = np.array([[3, 9], [1, 9]], dtype=np.int64)
    result = classify(data, 10, None, batched=False)
    assert result.shape == (4,)
    assert result.tolist() == [b"9:1", b"9:3", b"3:0", b"1:2"]


def test_batch_item_with_extra_dimensions_is_flattened() -> None:
    data = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert classify(data, 1, None, batched=True).tolist() == [[b"5:5"], [b"11:5"]]


def test_empty_batch() -> None:
    assert classify(np.zeros((0, 4), dtype=np.float64), 2, None, batched=True).shape == (0, 2)


@pytest.mark.parametrize("dtype", [np.float16, np.bool_, object])
def test_non_numeric_data_is_refused(dtype: type) -> None:
    with pytest.raises(InvalidArgument, match="classification is not available"):
        classify(np.zeros((1, 2), dtype=dtype), 1, None, batched=True)


def test_missing_label_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"label file .* not found"):
        load_labels(tmp_path / "nope.txt")
