"""A batch's tensors on their way into and out of a runtime: the requests' inputs concatenated
along the batch dimension, and the runtime's outputs checked and sliced back per request.

Where it sits in the data flow: ServedModel's execution (model.py) ─▶ ``gather_inputs`` ─▶
Runtime.infer ─▶ ``split_outputs`` ─▶ each request's ItemResult.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.core.errors import InternalError
from services.core.requests import Array, InferRequest


def gather_inputs(payloads: Sequence[InferRequest]) -> dict[str, Array]:
    """One request's inputs as they are; several requests' concatenated, in request order."""
    if len(payloads) == 1:
        return payloads[0].inputs
    return {n: np.concatenate([p.inputs[n] for p in payloads]) for n in payloads[0].inputs}


def split_outputs(
    model: str, results: dict[str, Array], expected: Sequence[str], sizes: Sequence[int]
) -> list[dict[str, Array]]:
    """Each request's slice of ``results`` (``sizes``: the requests' batch sizes, in order).

    The runtime must have returned every ``expected`` output, each with the whole batch first
    when the batch holds more than one request; otherwise the batch fails with INTERNAL.
    """
    missing = [n for n in expected if n not in results]
    if missing:
        raise InternalError(f"model '{model}' returned no value for outputs {missing}")
    if len(sizes) == 1:
        return [results]
    total = sum(sizes)
    for n, arr in results.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise InternalError(
                f"model '{model}' output '{n}' has shape {list(arr.shape)}; "
                f"expected the batch dimension {total} first"
            )
    parts: list[dict[str, Array]] = []
    offset = 0
    for size in sizes:
        parts.append({n: arr[offset : offset + size] for n, arr in results.items()})
        offset += size
    return parts
