"""Auto-complete for torch.export programs: fill a config's missing inputs/outputs from the file.

Called by TorchRuntime.autocomplete (services/core runs it before validating a config). Triton's
PyTorch backend auto-completes nothing, because a TorchScript file does not record its tensor
types and shapes; a TorchScript model therefore needs a full config. A torch.export program
does record them, so for ``model.pt2``:

- when the config lists no inputs, every user input of the program is added under its forward()
  argument name, with its dtype and shape;
- when the config lists no outputs, the outputs are added as ``OUTPUT__<i>`` (or under their
  keys when forward() returns a dict);
- with ``max_batch_size`` > 0 the first dimension is left out of dims; symbolic dimensions
  become -1. ``max_batch_size`` itself is never changed; nothing the user wrote is overwritten;
- a stateful model's control inputs and state (sequence_batching), which the server supplies,
  are left out, matched by name or by their ``<name>__<index>`` position.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError
from services.torch.tensors import TORCH_TO_CONFIG


def _dims(value: Any, batching: bool) -> list[int]:
    shape = list(value.shape)
    dims = [d if isinstance(d, int) else -1 for d in shape]
    return dims[1:] if batching and dims else dims


def _add(
    config: mc.ModelConfig, tensors: Any, kind: str, names: Sequence[str], values: Sequence[Any]
) -> None:
    batching = config.max_batch_size > 0
    for name, value in zip(names, values, strict=True):
        data_type = TORCH_TO_CONFIG.get(getattr(value, "dtype", None))  # type: ignore[arg-type]
        if data_type is None:
            raise ModelLoadError(
                f"model '{config.name}': cannot auto-complete {kind} '{name}' of type "
                f"{getattr(value, 'dtype', type(value).__name__)}; write the {kind} in "
                "config.pbtxt"
            )
        io = tensors.add()
        io.name = name
        io.data_type = data_type
        io.dims.extend(_dims(value, batching))


def autocomplete_exported(config: mc.ModelConfig, path: Path) -> None:
    """Fill inputs and outputs the config leaves out from the torch.export program at ``path``."""
    if config.input and config.output:
        return
    program = torch.export.load(path)
    signature = program.graph_signature
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    server_inputs, server_outputs = _sequence_tensors(config)
    if not config.input:
        names = [str(n) for n in signature.user_inputs]
        values = [placeholders[n].meta.get("val") for n in names]
        keep = [i for i, n in enumerate(names) if not _reserved(n, i, server_inputs)]
        _add(config, config.input, "input", [names[i] for i in keep], [values[i] for i in keep])
    if not config.output:
        output = next(n for n in program.graph.nodes if n.op == "output")
        values = [a.meta.get("val") for a in output.args[0]][: len(signature.user_outputs)]
        out_spec = program.call_spec.out_spec
        keys = out_spec.context if out_spec is not None and out_spec.type is dict else None
        names = [str(k) for k in keys] if keys else [f"OUTPUT__{i}" for i in range(len(values))]
        keep = [i for i, n in enumerate(names) if not _reserved(n, i, server_outputs)]
        _add(config, config.output, "output", [names[i] for i in keep], [values[i] for i in keep])


_INDEXED = re.compile(r"^.+__(\d+)$")


def _sequence_tensors(config: mc.ModelConfig) -> tuple[set[str], set[str]]:
    """The inputs and outputs a stateful model's sequence_batching reserves for the server."""
    sb = config.sequence_batching
    inputs = {c.name for c in sb.control_input} | {s.input_name for s in sb.state}
    return inputs, {s.output_name for s in sb.state}


def _reserved(name: str, index: int, reserved: set[str]) -> bool:
    """Whether forward()'s argument or result ``name`` at ``index`` is one of ``reserved``, by
    name or by a ``<name>__<index>`` position."""
    if name in reserved:
        return True
    return any((m := _INDEXED.match(r)) is not None and int(m.group(1)) == index for r in reserved)
