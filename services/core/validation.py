"""Request validation against a model's config, between decoding and the batcher.

ServedModel builds one RequestValidator per loaded model version (the per-config lookups are
computed once) and calls it on every request before queueing it. A request that passes has:
only known inputs, every required input, the config's datatypes, shapes that fit the config's
dims (first dimension = batch size when max_batch_size > 0, one batch size for all inputs),
and only known outputs (classification only on numeric outputs).

The validator returns the request's batch size and its signature: the non-batch shapes of its
inputs in config order (None for an absent optional input, RAGGED for an input with
``allow_ragged_batch``, whose shape may differ within a batch). Only requests with equal
signatures may share a batch. Inputs whose config has ``reshape`` are replaced by views of the
reshaped shape (batch dimension kept), which is what the runtime expects, as in Triton.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes
from services.core.errors import InvalidArgument
from services.core.requests import Array, InferRequest

#: datatypes Triton can compute top-k classification for
CLASSIFIABLE = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"}
)

Signature = tuple[tuple[int, ...] | None, ...]
#: a ragged input's place in a signature: any shape may join the batch
RAGGED: tuple[int, ...] = (-1,)


@dataclass(frozen=True, slots=True)
class _InputSpec:
    name: str
    datatype: str
    dtype: np.dtype[Any]
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None
    optional: bool


class RequestValidator:
    """Checks requests for one model config; ``__call__`` is the cheap per-request part."""

    def __init__(self, config: mc.ModelConfig) -> None:
        self.model = config.name
        self.max_batch_size = config.max_batch_size
        self.batched = config.max_batch_size > 0
        self._inputs: dict[str, _InputSpec] = {}
        for spec in config.input:
            kind = dtypes.from_config(spec.data_type)
            reshape = tuple(spec.reshape.shape) if spec.HasField("reshape") else None
            self._inputs[spec.name] = _InputSpec(
                name=spec.name,
                datatype=kind.name,
                dtype=kind.numpy,
                dims=tuple(spec.dims),
                reshape=reshape if reshape != tuple(spec.dims) else None,
                optional=spec.optional,
            )
        self._required = tuple(s.name for s in self._inputs.values() if not s.optional)
        #: ragged inputs (allow_ragged_batch) do not count in the signature
        self._ragged = frozenset(io.name for io in config.input if io.allow_ragged_batch)
        self._outputs = {o.name: dtypes.triton_from_config(o.data_type) for o in config.output}
        self._input_list = ", ".join(f"'{n}'" for n in self._inputs) or "(none)"
        self._output_list = ", ".join(f"'{n}'" for n in self._outputs) or "(none)"

    def __call__(self, req: InferRequest) -> tuple[int, Signature]:
        """Validate ``req``; return (batch size, signature). Batch size is 1 for unbatched models.

        Raises InvalidArgument saying what to change.
        """
        batch_size = 0
        batch_source = ""
        for name, arr in req.inputs.items():
            spec = self._inputs.get(name)
            if spec is None:
                raise InvalidArgument(
                    f"unexpected input '{name}' for model '{self.model}'; expected one of"
                    f" {self._input_list}"
                )
            self._check_datatype(spec, arr)
            shape = arr.shape
            if self.batched:
                size = self._batch_size(spec, shape)
                if batch_size == 0:
                    batch_size, batch_source = size, name
                elif size != batch_size:
                    raise InvalidArgument(
                        f"input '{name}' has batch size {size} but input '{batch_source}' has"
                        f" {batch_size} (model '{self.model}'); all inputs of one request must"
                        " have the same first dimension"
                    )
                self._check_dims(spec, shape[1:], shape)
            else:
                self._check_dims(spec, shape, shape)
        for name in self._required:
            if name not in req.inputs:
                raise InvalidArgument(
                    f"missing required input '{name}' for model '{self.model}'; got"
                    f" {sorted(req.inputs)}, the model needs {list(self._required)}"
                )
        self._check_outputs(req)
        signature = self._signature(req.inputs)
        self._apply_reshapes(req)
        return (batch_size if self.batched else 1), signature

    def _check_datatype(self, spec: _InputSpec, arr: Array) -> None:
        if arr.dtype == spec.dtype:
            return
        got = dtypes.name_of_numpy(arr.dtype)
        if got == spec.datatype:  # e.g. a numpy "S" array for BYTES
            return
        raise InvalidArgument(
            f"input '{spec.name}' for model '{self.model}' has datatype {got or arr.dtype} but"
            f" the model expects {spec.datatype}; send {spec.datatype} data"
        )

    def _batch_size(self, spec: _InputSpec, shape: tuple[int, ...]) -> int:
        if not shape:
            raise InvalidArgument(
                f"input '{spec.name}' for model '{self.model}' has no batch dimension; the model"
                f" has max_batch_size {self.max_batch_size}, so send shape"
                f" {_format(('batch', *spec.dims))}"
            )
        size = int(shape[0])
        if size > self.max_batch_size:
            raise InvalidArgument(
                f"batch size {size} exceeds max_batch_size {self.max_batch_size} of model"
                f" '{self.model}' (input '{spec.name}'); split the request"
            )
        if size < 1:
            raise InvalidArgument(
                f"input '{spec.name}' for model '{self.model}' has batch size {size}; the first"
                f" dimension is the batch size and must be 1..{self.max_batch_size}"
            )
        return size

    def _check_dims(self, spec: _InputSpec, dims: tuple[int, ...], full: tuple[int, ...]) -> None:
        if _fits(dims, spec.dims):
            return
        expected = ("batch", *spec.dims) if self.batched else spec.dims
        raise InvalidArgument(
            f"unexpected shape for input '{spec.name}' for model '{self.model}': got"
            f" {_format(full)}, expected {_format(expected)} (-1 = any size)"
        )

    def _check_outputs(self, req: InferRequest) -> None:
        for out in req.outputs:
            datatype = self._outputs.get(out.name)
            if datatype is None:
                raise InvalidArgument(
                    f"unexpected inference output '{out.name}' for model '{self.model}'; the"
                    f" model has outputs {self._output_list}"
                )
            if out.classification and datatype not in CLASSIFIABLE:
                raise InvalidArgument(
                    f"classification is not available for output '{out.name}' of model"
                    f" '{self.model}': its datatype {datatype} is not numeric (INT*, UINT*,"
                    " FP32, FP64); request it without the classification parameter"
                )

    def _signature(self, inputs: dict[str, Array]) -> Signature:
        skip = 1 if self.batched else 0
        if self._ragged:
            return tuple(
                None if n not in inputs else RAGGED if n in self._ragged else inputs[n].shape[skip:]
                for n in self._inputs
            )
        return tuple(tuple(inputs[n].shape[skip:]) if n in inputs else None for n in self._inputs)

    def _apply_reshapes(self, req: InferRequest) -> None:
        for name, arr in req.inputs.items():
            spec = self._inputs[name]
            if spec.reshape is None:
                continue
            lead = arr.shape[:1] if self.batched else ()
            rest = arr.shape[len(lead) :]
            target = _reshape_target(spec, rest)
            req.inputs[name] = arr.reshape(lead + target)


def validate_request(req: InferRequest, config: mc.ModelConfig) -> tuple[int, Signature]:
    """One-off validation; on the hot path keep a RequestValidator per config instead."""
    return RequestValidator(config)(req)


def _fits(shape: Sequence[int], dims: Sequence[int]) -> bool:
    if len(shape) != len(dims):
        return False
    return all(d == -1 or d == s for s, d in zip(shape, dims, strict=True))


def _reshape_target(spec: _InputSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Fill the reshape's -1s with the request's wildcard sizes, in order."""
    assert spec.reshape is not None
    wild = [s for s, d in zip(shape, spec.dims, strict=True) if d == -1]
    holes = sum(1 for d in spec.reshape if d == -1)
    if holes == len(wild):
        sizes = iter(wild)
        return tuple(next(sizes) if d == -1 else d for d in spec.reshape)
    if holes <= 1:
        return spec.reshape  # numpy infers a single -1 from the element count
    raise InvalidArgument(
        f"cannot reshape input '{spec.name}' of shape {_format(shape)} to the config's reshape"
        f" {_format(spec.reshape)}: the wildcards do not line up; fix the model config"
    )


def _format(shape: Sequence[Hashable]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
