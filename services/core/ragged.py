"""Ragged batching: inputs whose shapes may differ between the requests of one batch, and the
tensors the server derives from a formed batch (Triton's ``allow_ragged_batch``,
``batch_input`` and ``batch_output``).

Where it sits in the data flow: config validation calls ``config_problem``; ServedModel loads
the runtime with ``runtime_view(config)`` and, for a model whose config uses any of the three,
runs ``BatchLayout.gather`` / ``BatchLayout.split`` instead of batch_io's plain concatenation
and slicing. Other models never reach this module.

- **Ragged input** (``allow_ragged_batch: true``): requests whose shapes of that input differ
  still share a batch (validation leaves the input out of the batch signature). The runtime
  gets it as one 1-D tensor: every request's elements, flattened, in request order, as
  Triton's ONNX Runtime, TensorFlow, PyTorch and TensorRT backends pass it.
- **Batch input**: a model input the server makes from the formed batch, for each name in
  ``target_name``, of ``data_type`` INT32 or FP32, from ``source_input``'s shapes (n = the
  number of requests; a request's element count includes its batch dimension):
  BATCH_ELEMENT_COUNT [n] each request's count; BATCH_ACCUMULATED_ELEMENT_COUNT [n] the running
  total (where each request ends); BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO [n + 1] the same
  after a leading 0; BATCH_MAX_ELEMENT_COUNT_AS_SHAPE [largest count], zeros (only its shape
  says something); BATCH_ITEM_SHAPE [batch size, rank] each batch item's shape (its request's
  shape without the batch dimension, once per item); BATCH_ITEM_SHAPE_FLATTEN the same as one
  1-D tensor. Clients never send them; the runtime gets them after the config's inputs.
- **Batch output** BATCH_SCATTER_WITH_INPUT_SHAPE: the model returns the output for the whole
  batch as one run of elements; each request gets the next elements, shaped like the output's
  config shape (batch dimension first when batching) with every -1 taken from the request's
  ``source_input`` shape at the same position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np

from protos.gen.inference import model_config_pb2 as mc
from services.core.batch_io import split_outputs
from services.core.errors import InternalError
from services.core.requests import Array, InferRequest

_Kind = mc.BatchInput.Kind
_DTYPES: dict[int, np.dtype[Any]] = {
    mc.TYPE_INT32: np.dtype(np.int32),
    mc.TYPE_FP32: np.dtype(np.float32),
}
#: batch input kinds whose tensor has one dimension more than a 1-D list (BATCH_ITEM_SHAPE)
_TWO_D = frozenset({_Kind.BATCH_ITEM_SHAPE})


def uses_ragged_batching(config: mc.ModelConfig) -> bool:
    """True when the config has a ragged input, a batch_input or a batch_output."""
    return bool(
        config.batch_input
        or config.batch_output
        or any(io.allow_ragged_batch for io in config.input)
    )


def config_problem(config: mc.ModelConfig) -> str | None:
    """What is wrong with the config's batch_input / batch_output entries, or None."""
    inputs = {i.name: i for i in config.input}
    outputs = {o.name: o for o in config.output}
    targets: list[str] = []
    for b_in in config.batch_input:
        label = f"batch_input {list(b_in.target_name)}"
        if not b_in.target_name:
            return "a batch_input needs a target_name: the model input it fills"
        if len(b_in.source_input) != 1:
            return f"{label} needs exactly 1 source_input"
        if b_in.data_type not in _DTYPES:
            return f"{label} data_type must be TYPE_INT32 or TYPE_FP32"
        source = inputs.get(b_in.source_input[0])
        if source is not None and source.optional:
            return (
                f"{label} takes its values from optional input '{source.name}'; a batch input "
                "needs its source in every request, so make the input required"
            )
        targets.extend(b_in.target_name)
    declared = sorted(set(targets) & set(inputs))
    if declared:
        return (
            f"batch_input target_name {declared} is also declared in 'input'; the server makes "
            "batch inputs itself, so remove them from 'input'"
        )
    if len(set(targets)) != len(targets):
        return f"batch_input target_name {targets} repeats a name"
    for b_out in config.batch_output:
        label = f"batch_output {list(b_out.target_name)}"
        if len(b_out.source_input) != 1:
            return f"{label} needs exactly 1 source_input"
        missing = [t for t in b_out.target_name if t not in outputs]
        if missing:
            return f"batch_output target_name {missing} is not a declared output"
        if len(set(b_out.target_name)) != len(b_out.target_name):
            return f"{label} repeats a name"
        source = inputs.get(b_out.source_input[0])
        if source is None:
            continue  # reported below, with the batch inputs' sources
        for name in b_out.target_name:
            dims = list(outputs[name].dims)
            holes = [i for i, d in enumerate(dims) if d == -1]
            if holes and holes[-1] >= len(source.dims):
                return (
                    f"{label}: output '{name}' dims {dims} have a -1 at a position that input "
                    f"'{source.name}' (dims {list(source.dims)}) does not have, so its shape "
                    "cannot be taken from the input"
                )
    sources = [s for b in config.batch_input for s in b.source_input]
    sources += [s for b in config.batch_output for s in b.source_input]
    unknown = [s for s in sources if s not in inputs]
    if unknown:
        return f"batch input/output source_input {unknown} is not a declared input"
    return None


def runtime_view(config: mc.ModelConfig) -> mc.ModelConfig:
    """The config a framework runtime checks the model file against and feeds from: each
    ragged input declared 1-D, each batch input target appended as an input of its shape, each
    scattered output flat; ``config`` itself when it uses none of them."""
    if not uses_ragged_batching(config):
        return config
    view = mc.ModelConfig()
    view.CopyFrom(config)
    batching = config.max_batch_size > 0
    # with batching the runtime adds the batch dimension: no dims left means 1-D
    one_d: list[int] = [] if batching else [-1]
    for io in view.input:
        if io.allow_ragged_batch:
            del io.dims[:]
            io.dims.extend(one_d)
            io.ClearField("reshape")
    # a scattered output leaves the model flat: its config dims are the requests' view, so the
    # runtime does not hold the model to them (a reshape skips that check, as Triton skips it)
    scattered = {name for b in config.batch_output for name in b.target_name}
    for out in view.output:
        if out.name in scattered:
            out.reshape.SetInParent()
            del out.reshape.shape[:]
            out.reshape.shape.extend(one_d)
    sources = {io.name: io for io in config.input}
    for b_in in config.batch_input:
        dims = list(one_d)
        if b_in.kind in _TWO_D:
            rank = len(sources[b_in.source_input[0]].dims)
            dims = [rank] if batching else [-1, rank]
        for name in b_in.target_name:
            view.input.add(name=name, data_type=b_in.data_type, dims=dims)
    return view


@dataclass(frozen=True, slots=True)
class _BatchInput:
    kind: int
    targets: tuple[str, ...]
    dtype: np.dtype[Any]
    source: str


class BatchLayout:
    """How one model's batches are put together and taken apart (module docstring)."""

    def __init__(self, config: mc.ModelConfig) -> None:
        self.model = config.name
        self._batched = config.max_batch_size > 0
        self._ragged = frozenset(io.name for io in config.input if io.allow_ragged_batch)
        self._batch_inputs = tuple(
            _BatchInput(b.kind, tuple(b.target_name), _DTYPES[b.data_type], b.source_input[0])
            for b in config.batch_input
        )
        dims = {o.name: tuple(o.dims) for o in config.output}
        #: output name → (its config dims, the input its request shapes come from)
        self._scatter = {
            name: (dims[name], b.source_input[0])
            for b in config.batch_output
            for name in b.target_name
        }

    def gather(self, payloads: Sequence[InferRequest]) -> dict[str, Array]:
        """The batch's inputs: ragged ones flattened and joined, the rest concatenated along
        the batch dimension, then the batch inputs."""
        first = payloads[0].inputs
        inputs: dict[str, Array] = {}
        for name in first:
            if name in self._ragged:
                inputs[name] = np.concatenate([p.inputs[name].reshape(-1) for p in payloads])
            elif len(payloads) == 1:
                inputs[name] = first[name]
            else:
                inputs[name] = np.concatenate([p.inputs[name] for p in payloads])
        for b_in in self._batch_inputs:
            value = self._batch_input(b_in, [p.inputs[b_in.source].shape for p in payloads])
            for target in b_in.targets:
                inputs[target] = value
        return inputs

    def _batch_input(self, b_in: _BatchInput, shapes: Sequence[tuple[int, ...]]) -> Array:
        counts = [prod(s) for s in shapes]
        kind = b_in.kind
        if kind == _Kind.BATCH_ELEMENT_COUNT:
            return np.array(counts, dtype=b_in.dtype)
        if kind == _Kind.BATCH_ACCUMULATED_ELEMENT_COUNT:
            return np.cumsum(counts).astype(b_in.dtype)
        if kind == _Kind.BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO:
            return np.cumsum([0, *counts]).astype(b_in.dtype)
        if kind == _Kind.BATCH_MAX_ELEMENT_COUNT_AS_SHAPE:
            return np.zeros(max(counts), dtype=b_in.dtype)
        items = [
            list(s[1:]) if self._batched else list(s)
            for s in shapes
            for _ in range(s[0] if self._batched else 1)
        ]
        table = np.array(items, dtype=b_in.dtype).reshape(len(items), -1)
        return table.reshape(-1) if kind == _Kind.BATCH_ITEM_SHAPE_FLATTEN else table

    def split(
        self,
        results: dict[str, Array],
        expected: Sequence[str],
        payloads: Sequence[InferRequest],
        sizes: Sequence[int],
    ) -> list[dict[str, Array]]:
        """Each request's outputs: scattered outputs by their source input's shapes, the rest
        sliced along the batch dimension. A runtime result that does not fit fails the batch
        with INTERNAL."""
        plain = {n: a for n, a in results.items() if n not in self._scatter}
        wanted = [n for n in expected if n not in self._scatter]
        parts = split_outputs(self.model, plain, wanted, sizes)  # ``plain`` is ours to fill
        for name, scatter in self._scatter.items():
            if name not in results:
                if name in expected:
                    raise InternalError(f"model '{self.model}' returned no value for '{name}'")
                continue
            self._scatter_output(name, results[name], scatter, payloads, parts)
        return parts

    def _scatter_output(
        self,
        name: str,
        arr: Array,
        scatter: tuple[tuple[int, ...], str],
        payloads: Sequence[InferRequest],
        parts: list[dict[str, Array]],
    ) -> None:
        dims, source = scatter
        shapes = [self._scatter_shape(dims, p.inputs[source].shape) for p in payloads]
        needed = sum(prod(s) for s in shapes)
        if arr.size != needed:
            raise InternalError(
                f"model '{self.model}' output '{name}' has {arr.size} elements; scattered by "
                f"input '{source}' the batch needs {needed}"
            )
        flat = arr.reshape(-1)
        offset = 0
        for part, shape in zip(parts, shapes, strict=True):
            count = prod(shape)
            part[name] = flat[offset : offset + count].reshape(shape)
            offset += count

    def _scatter_shape(self, dims: tuple[int, ...], source: tuple[int, ...]) -> tuple[int, ...]:
        lead = source[:1] if self._batched else ()
        item = source[len(lead) :]
        return lead + tuple(item[i] if d == -1 else d for i, d in enumerate(dims))
