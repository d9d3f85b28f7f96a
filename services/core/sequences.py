"""Stateful models: what Triton's sequence batcher needs from a config and from each request.

A model with ``sequence_batching`` serves sequences of requests that share a correlation ID
(the request parameters ``sequence_id``, ``sequence_start``, ``sequence_end`` that tritonclient
sends). This module holds the pure parts; the scheduling is in sequence_batcher.py:

* ``SequenceSettings.from_config``: strategy, slots, idle timeout, the control inputs the server
  feeds the model (START / END / READY / CORRID) and the implicit state (``state``: an input the
  server feeds with what the model returned in its paired output on the sequence's previous
  request, zeros or ``initial_state`` on its first).
* ``sequence_flags``: the correlation ID and the START / END flags of one request, with the
  errors Triton gives when they are missing or malformed.
* ``SequenceSettings.model_inputs``: the tensors added to one request before it runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes
from services.core.errors import InvalidArgument, ModelLoadError
from services.core.requests import Array, ParamValue

log = logging.getLogger(__name__)

_Kind = mc.ModelSequenceBatching.Control

#: the request parameters tritonclient sets for a sequence request
SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END = "sequence_id", "sequence_start", "sequence_end"

_UINT64_MAX = 2**64 - 1

#: a correlation ID: tritonclient sends an unsigned integer or a string
CorrelationId = int | str

_CORRID_TYPES = {
    mc.TYPE_UINT64: np.uint64,
    mc.TYPE_INT64: np.int64,
    mc.TYPE_UINT32: np.uint32,
    mc.TYPE_INT32: np.int32,
    mc.TYPE_STRING: np.object_,
}


@dataclass(frozen=True, slots=True)
class SequenceFlags:
    """One request's place in its sequence."""

    correlation_id: CorrelationId
    start: bool = False
    end: bool = False


@dataclass(frozen=True, slots=True)
class ControlInput:
    """A model input the server sets: a START / END / READY flag, or the correlation ID."""

    name: str
    kind: int  # ModelSequenceBatching.Control.Kind
    dtype: np.dtype[Any]
    #: the values meaning false and true (flags only)
    false_true: tuple[Any, Any] = (0, 1)


@dataclass(frozen=True, slots=True)
class StateTensor:
    """An implicit state: fed to ``input_name``, taken back from ``output_name``."""

    input_name: str
    output_name: str
    #: the state's value on a sequence's first request (without the batch dimension)
    initial: Array


@dataclass(frozen=True, slots=True)
class SequenceSettings:
    """A model's sequence_batching section, checked; ``None`` from ``from_config`` without one."""

    model: str
    #: "direct" (a fixed slot per sequence) or "oldest" (batches of the oldest ready sequences)
    strategy: str
    #: requests of different sequences run together (max_batch_size > 0)
    batched: bool
    max_batch_size: int
    #: sequences each instance holds at once; later ones wait for a slot
    slots_per_instance: int
    #: a sequence with nothing queued for this long loses its slot (and its state)
    idle_ns: int
    max_queue_delay_ns: int
    #: direct: run before the delay once this share of the instance's slots is ready
    minimum_slot_utilization: float
    #: oldest: run at once when this many sequences are ready
    preferred_batch_sizes: tuple[int, ...]
    controls: tuple[ControlInput, ...]
    states: tuple[StateTensor, ...]

    @property
    def state_outputs(self) -> tuple[str, ...]:
        """The model outputs the server keeps as state (never sent to the client)."""
        return tuple(s.output_name for s in self.states)

    @property
    def added_inputs(self) -> tuple[str, ...]:
        """The model inputs the server supplies (clients must not)."""
        return tuple(c.name for c in self.controls) + tuple(s.input_name for s in self.states)

    @classmethod
    def from_config(cls, config: mc.ModelConfig, version_path: Path) -> SequenceSettings | None:
        if not config.HasField("sequence_batching"):
            return None
        sb = config.sequence_batching
        name = config.name
        if sb.iterative_sequence:
            raise ModelLoadError(
                f"model '{name}': sequence_batching iterative_sequence is not supported; "
                "send each step of the sequence as a request"
            )
        slots = max(1, config.max_batch_size)
        oldest = sb.WhichOneof("strategy_choice") == "oldest"
        if oldest and sb.oldest.preserve_ordering:
            log.warning(
                "model %r: oldest.preserve_ordering is ignored (each sequence's responses are "
                "in order; responses of different sequences are not ordered)",
                name,
            )
        delay_us = sb.oldest.max_queue_delay_microseconds if oldest else 0
        utilization = 0.0
        if not oldest and sb.direct.minimum_slot_utilization > 0:
            # Triton: direct's delay only applies with a minimum slot utilization set
            delay_us = sb.direct.max_queue_delay_microseconds
            utilization = sb.direct.minimum_slot_utilization
        if oldest and sb.oldest.max_candidate_sequences > 0:
            slots = sb.oldest.max_candidate_sequences
        return cls(
            model=name,
            strategy="oldest" if oldest else "direct",
            batched=config.max_batch_size > 0,
            max_batch_size=max(1, config.max_batch_size),
            slots_per_instance=slots,
            idle_ns=sb.max_sequence_idle_microseconds * 1000,
            max_queue_delay_ns=delay_us * 1000,
            minimum_slot_utilization=utilization,
            preferred_batch_sizes=tuple(sorted(set(sb.oldest.preferred_batch_size)))
            if oldest
            else (),
            controls=tuple(_controls(name, sb)),
            states=tuple(_state(name, s, version_path) for s in sb.state),
        )

    def check_correlation_id(self, cid: CorrelationId) -> None:
        """InvalidArgument when the model's CORRID input cannot carry ``cid``."""
        for control in self.controls:
            if control.kind != _Kind.CONTROL_SEQUENCE_CORRID or control.dtype == np.object_:
                continue
            if isinstance(cid, str):
                raise InvalidArgument(
                    f"model '{self.model}' takes integer correlation IDs "
                    f"({control.dtype} input '{control.name}'); sequence_id {cid!r} is a string"
                )
            if cid > np.iinfo(control.dtype).max:
                raise InvalidArgument(
                    f"sequence_id {cid} does not fit model '{self.model}''s {control.dtype} "
                    f"correlation ID input '{control.name}'"
                )

    def model_inputs(
        self, flags: SequenceFlags, state: dict[str, Array] | None
    ) -> dict[str, Array]:
        """The control and state tensors for one request (batch size 1) of a sequence."""
        shape = (1, 1) if self.batched else (1,)
        tensors: dict[str, Array] = {}
        for control in self.controls:
            if control.kind == _Kind.CONTROL_SEQUENCE_CORRID:
                value: Any = flags.correlation_id
                if control.dtype == np.object_:
                    value = str(value).encode()
            else:
                on = (
                    flags.start
                    if control.kind == _Kind.CONTROL_SEQUENCE_START
                    else flags.end
                    if control.kind == _Kind.CONTROL_SEQUENCE_END
                    else True  # READY: every request in a batch is ready
                )
                value = control.false_true[1 if on else 0]
            tensors[control.name] = np.full(shape, value, dtype=control.dtype)
        for spec in self.states:
            held = None if state is None or flags.start else state.get(spec.output_name)
            value = spec.initial if held is None else held
            tensors[spec.input_name] = value[np.newaxis] if self.batched else value
        return tensors


def _controls(model: str, sb: mc.ModelSequenceBatching) -> list[ControlInput]:
    found: list[ControlInput] = []
    for control_input in sb.control_input:
        if len(control_input.control) != 1:
            raise ModelLoadError(
                f"model '{model}': sequence_batching control_input '{control_input.name}' "
                f"must have exactly one control, it has {len(control_input.control)}"
            )
        control = control_input.control[0]
        where = f"model '{model}': control_input '{control_input.name}'"
        if control.kind == _Kind.CONTROL_SEQUENCE_CORRID:
            dtype = _CORRID_TYPES.get(control.data_type)
            if dtype is None:
                raise ModelLoadError(
                    f"{where}: CONTROL_SEQUENCE_CORRID needs data_type TYPE_UINT64, TYPE_INT64, "
                    "TYPE_UINT32, TYPE_INT32 or TYPE_STRING"
                )
            found.append(ControlInput(control_input.name, control.kind, np.dtype(dtype)))
            continue
        given: list[tuple[np.dtype[Any], tuple[Any, ...]]] = [
            (np.dtype(np.int32), tuple(control.int32_false_true)),
            (np.dtype(np.float32), tuple(control.fp32_false_true)),
            (np.dtype(np.bool_), tuple(control.bool_false_true)),
        ]
        chosen = [(t, v) for t, v in given if v]
        if len(chosen) != 1 or len(chosen[0][1]) != 2:
            raise ModelLoadError(
                f"{where}: {_Kind.Kind.Name(control.kind)} needs exactly one of "
                "int32_false_true, fp32_false_true or bool_false_true, with two values"
            )
        kind_dtype, (false, true) = chosen[0]
        found.append(ControlInput(control_input.name, control.kind, kind_dtype, (false, true)))
    return found


def _state(model: str, spec: mc.ModelSequenceBatching.State, version_path: Path) -> StateTensor:
    where = f"model '{model}': sequence_batching state '{spec.input_name}'"
    if not spec.input_name or not spec.output_name:
        raise ModelLoadError(f"{where} must set both input_name and output_name")
    try:
        dtype = dtypes.numpy_from_config(spec.data_type)
    except Exception as exc:
        raise ModelLoadError(f"{where}: data_type: {exc}") from exc
    dims = list(spec.dims)
    data_file = ""
    if spec.initial_state:
        if len(spec.initial_state) != 1:
            raise ModelLoadError(f"{where} may have one initial_state")
        initial = spec.initial_state[0]
        dims = list(initial.dims) or dims
        data_file = initial.data_file if initial.WhichOneof("state_data") == "data_file" else ""
    if not dims:
        raise ModelLoadError(f"{where} must set dims")
    if any(d < 0 for d in dims):
        raise ModelLoadError(
            f"{where} has variable dims {dims}; give initial_state dims for its first value"
        )
    if not data_file:
        return StateTensor(spec.input_name, spec.output_name, np.zeros(dims, dtype=dtype))
    path = version_path / "initial_state" / data_file
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot read initial_state file {path}: {exc}") from exc
    if dtype == np.object_:
        values = dtypes.deserialize_bytes(raw, int(np.prod(dims)), str(path))
    else:
        count = int(np.prod(dims))
        if len(raw) != count * dtype.itemsize:
            raise ModelLoadError(
                f"{where}: {path} has {len(raw)} bytes, {dims} {dtype} needs "
                f"{count * dtype.itemsize}"
            )
        values = np.frombuffer(raw, dtype=dtype)
    return StateTensor(spec.input_name, spec.output_name, values.reshape(dims))


def sequence_flags(model: str, parameters: dict[str, ParamValue]) -> SequenceFlags:
    """The correlation ID and flags of a request to a stateful model (InvalidArgument if bad)."""
    cid = parameters.get(SEQUENCE_ID)
    if isinstance(cid, bool) or cid is None or cid == 0 or cid == "":
        raise InvalidArgument(
            f"inference request to model '{model}' must specify a non-zero or non-empty "
            f"correlation ID (request parameter '{SEQUENCE_ID}'): it is a stateful model"
        )
    if isinstance(cid, float) or (isinstance(cid, int) and not 0 < cid <= _UINT64_MAX):
        raise InvalidArgument(
            f"request parameter '{SEQUENCE_ID}' must be an unsigned 64-bit integer or a string, "
            f"got {cid!r}"
        )
    flags = []
    for key in (SEQUENCE_START, SEQUENCE_END):
        value = parameters.get(key, False)
        if not isinstance(value, bool):
            raise InvalidArgument(f"request parameter '{key}' must be a boolean, got {value!r}")
        flags.append(value)
    return SequenceFlags(cid, start=flags[0], end=flags[1])


def runtime_config(config: mc.ModelConfig) -> mc.ModelConfig:
    """The config a framework runtime loads a stateful model with: the control inputs and the
    implicit state declared as ordinary inputs and outputs (the runtime checks them against the
    model file and feeds them like any other); ``config`` itself when it is stateless."""
    if not config.HasField("sequence_batching"):
        return config
    full = mc.ModelConfig()
    full.CopyFrom(config)
    sb = config.sequence_batching
    declared = {io.name for io in config.input}
    for control_input in sb.control_input:
        if control_input.name in declared or len(control_input.control) != 1:
            continue
        control = control_input.control[0]
        if control.kind == _Kind.CONTROL_SEQUENCE_CORRID:
            data_type = control.data_type
        else:
            data_type = (
                mc.TYPE_INT32
                if control.int32_false_true
                else mc.TYPE_FP32
                if control.fp32_false_true
                else mc.TYPE_BOOL
            )
        full.input.add(name=control_input.name, data_type=data_type, dims=[1])
    outputs = {io.name for io in config.output}
    for state in sb.state:
        if state.input_name not in declared:
            full.input.add(name=state.input_name, data_type=state.data_type, dims=state.dims)
        if state.output_name not in outputs:
            full.output.add(name=state.output_name, data_type=state.data_type, dims=state.dims)
    return full
