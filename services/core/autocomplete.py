"""Triton's config auto-complete rules, once for every framework family.

A family's runtime reads its model file into tensors (name, config data type, shape) and calls
``complete_io``; what it fills:

- inputs: every model input missing from the config is added; outputs: all of them when the
  config lists none (a config that lists some outputs chose a subset, which is kept);
- a tensor the user named but left without ``data_type`` / ``dims`` gets them from the model;
- ``max_batch_size``: the user's value when set (> 0); otherwise, when every model input and
  output has a dynamic first dimension (and no user-written dims say otherwise), Triton's
  default of 4, with ``dynamic_batching`` when no scheduler is configured; otherwise 0;
- dims leave out the batch dimension when batching; unknown dimensions become -1;
- ``platform`` / ``backend`` are filled only where empty;
- a stateful model's control inputs and implicit state (``sequence_batching``) and the
  ``batch_input`` targets are left out: the server supplies them (services/core/sequences.py,
  services/core/ragged.py).
Nothing the user wrote is overwritten.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError

#: Triton's --backend-config=<backend>,default-max-batch-size default
DEFAULT_MAX_BATCH_SIZE = 4
_default_batch: contextvars.ContextVar[int] = contextvars.ContextVar(
    "default_max_batch_size", default=DEFAULT_MAX_BATCH_SIZE
)


def default_max_batch_size() -> int:
    """The max_batch_size auto-complete gives a model that can batch, in this context."""
    return _default_batch.get()


@contextmanager
def batch_default(size: int) -> Iterator[None]:
    """Auto-complete with ``size`` as the default max_batch_size (--backend-config
    default-max-batch-size) inside the block; 0 leaves such models unbatched."""
    token = _default_batch.set(size)
    try:
        yield
    finally:
        _default_batch.reset(token)


class ModelTensor(Protocol):
    """One input or output as a model file declares it."""

    @property
    def name(self) -> str: ...

    @property
    def data_type(self) -> int: ...

    @property
    def batchable(self) -> bool:
        """True when the first dimension is dynamic."""
        ...

    @property
    def rank(self) -> int | None:
        """Number of dimensions, None when unknown."""
        ...

    def dims(self, batching: bool) -> list[int]:
        """Config dims (-1 for unknown), without the first dimension when batching."""
        ...


def _user_batching_hint(config: mc.ModelConfig, tensors: Sequence[ModelTensor]) -> bool | None:
    """What user-written dims imply: True (one shorter than the model: batching), False, None."""
    by_name = {t.name: t for t in tensors}
    written: list[Any] = [*config.input, *config.output]
    for io in written:
        tensor = by_name.get(io.name)
        if tensor is None or tensor.rank is None or not io.dims or io.HasField("reshape"):
            continue
        if len(io.dims) == tensor.rank:
            return False
        if len(io.dims) == tensor.rank - 1:
            return True
    return None


def _fill(io: Any, tensor: ModelTensor, batching: bool) -> None:
    if io.data_type == mc.TYPE_INVALID:
        io.data_type = tensor.data_type
    if not io.dims and not io.HasField("reshape") and tensor.rank is not None:
        io.dims.extend(tensor.dims(batching))


def complete_io(
    config: mc.ModelConfig,
    inputs: Sequence[ModelTensor],
    outputs: Sequence[ModelTensor],
    *,
    platform: str,
    backend: str,
) -> None:
    """Apply the auto-complete rules (module docstring) to ``config`` in place."""
    if not config.platform and not config.backend:
        config.platform = platform
        config.backend = backend
    elif not config.backend and config.platform == platform:
        config.backend = backend

    # a stateful model's control and state tensors are the server's, not the client's
    server_inputs, server_outputs = _sequence_tensors(config)
    inputs = [t for t in inputs if t.name not in server_inputs]
    outputs = [t for t in outputs if t.name not in server_outputs]
    everything = [*inputs, *outputs]
    if config.max_batch_size == 0:
        can_batch = all(t.batchable for t in everything)
        if can_batch and _user_batching_hint(config, everything) is not False:
            config.max_batch_size = default_max_batch_size()
    batching = config.max_batch_size > 0
    if config.max_batch_size > 1 and config.WhichOneof("scheduling_choice") is None:
        config.dynamic_batching.SetInParent()

    named_inputs = {io.name: io for io in config.input}
    for tensor in inputs:
        model_input = named_inputs.get(tensor.name)
        if model_input is None:
            model_input = config.input.add(name=tensor.name)
        _fill(model_input, tensor, batching)

    if not config.output:
        for tensor in outputs:
            config.output.add(name=tensor.name)
    by_name = {t.name: t for t in outputs}
    for io in config.output:
        if io.name in by_name:
            _fill(io, by_name[io.name], batching)


def _sequence_tensors(config: mc.ModelConfig) -> tuple[set[str], set[str]]:
    """The model inputs and outputs the server supplies: sequence_batching's control inputs
    and state, batch_input targets (services/core/ragged.py)."""
    sb = config.sequence_batching
    inputs = {c.name for c in sb.control_input} | {s.input_name for s in sb.state}
    inputs |= {name for b in config.batch_input for name in b.target_name}
    return inputs, {s.output_name for s in sb.state}


def check_shape(
    model: str,
    kind: str,
    io: Any,
    tensor: ModelTensor,
    shape: Sequence[int],
    batching: bool,
    *,
    where: str,
    batch_fix: str,
) -> None:
    """The config's dims of one tensor must fit the model's ``shape`` (-1 = any).

    ``where`` says where the shape comes from ("the signature", "the engine"); ``batch_fix`` how
    to give the model a dynamic batch dimension. Raises ModelLoadError saying what to write.
    """
    if batching and not tensor.batchable:
        raise ModelLoadError(
            f"model '{model}': max_batch_size > 0 needs a dynamic first dimension, but {kind} "
            f"'{io.name}' has shape {list(shape)} in {where}; set max_batch_size: 0 "
            f"and give the full dims, or {batch_fix}"
        )
    if io.HasField("reshape"):
        return
    expected = ([-1] if batching else []) + list(io.dims)
    actual = list(shape)
    compatible = len(expected) == len(actual) and all(
        e == a or e == -1 or a == -1 for e, a in zip(expected, actual, strict=True)
    )
    if not compatible:
        raise ModelLoadError(
            f"model '{model}': config dims {list(io.dims)} of {kind} '{io.name}' do not match "
            f"shape {actual} in {where} (max_batch_size "
            f"{'> 0 adds' if batching else '0 adds no'} a batch dimension); write dims: "
            f"{tensor.dims(batching)}"
        )
