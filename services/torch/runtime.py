"""The PyTorch runtime: one loaded TorchScript module or exported program per model instance.

The model manager (services/core) creates one TorchRuntime per instance of a model version whose
config names platform "pytorch_libtorch" or backend "pytorch"; the scheduler calls ``infer``
with whole batches from a worker thread (torch releases the GIL inside its kernels).

Model files (in the version directory):
- ``model.pt``: TorchScript (``torch.jit.script(m).save`` / ``torch.jit.trace``), loaded with
  ``torch.jit.load(path, map_location=device)``;
- ``model.pt2``: a torch.export program (``torch.export.save``), chosen by the ``.pt2``
  extension (config ``default_model_filename: "model.pt2"``), loaded with ``torch.export.load``.
Neither loader unpickles arbitrary Python objects: TorchScript archives hold code that torch's
own interpreter compiles, and torch.export archives hold a serialized graph plus tensors
restored by a weights-only reader. ``torch.load`` with ``weights_only=False`` is never used, so a
plain pickled ``nn.Module`` (``torch.save(model)``) is refused with a message saying how to
convert it.

Tensor naming, as Triton's PyTorch backend:
- an input whose name is one of forward()'s argument names is passed as that argument;
- otherwise a name ending in ``__<index>`` (``INPUT__0``, ``input__1``) is the positional
  argument ``<index>``; inputs must cover forward()'s arguments 0..n-1 without gaps;
- an output named ``<name>__<index>`` is element ``<index>`` of the returned tuple/list (a single
  returned tensor is element 0) or, when forward() returns a dict, the entry of that name;
  any other output name must be a key of the returned dict.

A stateful model's control inputs (START__1, READY__2, ...) and implicit state (input
ACC_IN__3, output ACC_OUT__1) follow the same rules: the kit appends them to the config this
runtime loads with (services/core/sequences.py ``runtime_config``), so they take their places
among forward()'s arguments and results like any other input and output, and a load error about
one names the sequence_batching entry to rename.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.jit._fuser import optimized_execution

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import InternalError, ModelLoadError, Unavailable
from services.core.requests import Array
from services.core.runtime import InstanceSpec, Runtime
from services.torch import autocomplete as ac
from services.torch.options import RunPlan, plan_run
from services.torch.tensors import TORCH_TO_CONFIG, to_numpy, to_torch, unsupported_reason

logger = logging.getLogger(__name__)

_INDEXED = re.compile(r"^.*__(\d+)$")
EXPORT_SUFFIX = ".pt2"


def _indexed(name: str) -> int | None:
    match = _INDEXED.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class OutputBinding:
    """Where one config output is found in forward()'s result."""

    name: str
    index: int | None
    data_type: int


#: torch.jit.load is untyped in torch's stubs; it returns a torch.jit.ScriptModule
_jit_load: Callable[..., Any] = torch.jit.load


def _load_torchscript(model: str, path: Path, device: torch.device) -> Any:
    try:
        module = _jit_load(str(path), map_location=device)
    except Exception as exc:
        raise ModelLoadError(
            f"model '{model}': {path} is not a TorchScript archive torch can load ({exc}); save "
            "the model with torch.jit.script(model).save(path) or torch.jit.trace(...).save(path)"
            ", or export it with torch.export.save to model.pt2 and set "
            'default_model_filename: "model.pt2"'
        ) from exc
    module.eval()
    return module


def _load_exported(model: str, path: Path, device: torch.device) -> torch.nn.Module:
    try:
        program = torch.export.load(path)
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return program.module()
    except Exception as exc:
        raise ModelLoadError(
            f"model '{model}': {path} is not a torch.export program torch can load ({exc}); "
            "write it with torch.export.save(torch.export.export(model, args), path)"
        ) from exc


def _forward_arguments(module: Any) -> list[str]:
    """forward()'s argument names, without ``self``."""
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:
        return [a.name for a in schema.arguments][1:]
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_types(config: mc.ModelConfig) -> None:
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for io in tensors:
            reason = unsupported_reason(io.data_type)
            if reason is not None:
                raise ModelLoadError(f"model '{config.name}': {kind} '{io.name}' is {reason}")


def _declared_as(config: mc.ModelConfig, name: str) -> str:
    """Where config.pbtxt declares input ``name``: in ``input``, or (stateful models) as a
    sequence_batching control input or state, which the kit appends to the inputs."""
    sequence = config.sequence_batching
    if any(c.name == name for c in sequence.control_input):
        return f"sequence_batching control_input '{name}'"
    if any(s.input_name == name for s in sequence.state):
        return f"sequence_batching state input_name '{name}'"
    return f"input '{name}'"


def bind_inputs(config: mc.ModelConfig, arguments: Sequence[str], path: Path) -> list[str]:
    """Config input names in forward()'s positional order (see the module docstring)."""
    model = config.name
    # a stateful model's control and state inputs count too (the kit appended them)
    which = (
        "inputs, sequence_batching control inputs and state inputs"
        if config.HasField("sequence_batching")
        else "inputs"
    )
    slots: dict[int, str] = {}
    for io in config.input:
        if io.name in arguments:
            position: int | None = arguments.index(io.name)
        else:
            position = _indexed(io.name)
        if position is None:
            raise ModelLoadError(
                f"model '{model}': {_declared_as(config, io.name)} is neither an argument of "
                f"forward() in {path.name} (arguments: {list(arguments)}) nor named "
                "'<name>__<index>'; rename it to an argument name or to <name>__<position>"
            )
        if position in slots:
            raise ModelLoadError(
                f"model '{model}': {_declared_as(config, slots[position])} and "
                f"{_declared_as(config, io.name)} both map to forward() argument {position}; "
                "give each its own position"
            )
        slots[position] = io.name
    order = sorted(slots)
    if order != list(range(len(order))):
        missing = sorted(set(range(max(order, default=-1) + 1)) - set(order))
        raise ModelLoadError(
            f"model '{model}': the {which} leave forward() argument(s) {missing} unset; name "
            "them <name>__0..<name>__<n-1> without gaps"
        )
    if arguments and len(order) > len(arguments):
        raise ModelLoadError(
            f"model '{model}': config declares {len(order)} {which} but forward() in "
            f"{path.name} takes {len(arguments)} ({list(arguments)}); remove the extra ones"
        )
    return [slots[i] for i in order]


class TorchRuntime(Runtime):
    """Serves TorchScript and torch.export models with torch (CPU, or CUDA for KIND_GPU)."""

    backend: ClassVar[str] = "pytorch"
    platforms: ClassVar[tuple[str, ...]] = ("pytorch_libtorch",)
    default_model_filename: ClassVar[str] = "model.pt"

    @classmethod
    def autocomplete(cls, config: mc.ModelConfig, model_path: Path) -> None:
        """Fill inputs/outputs of a torch.export program; TorchScript needs a full config."""
        if model_path.suffix == EXPORT_SUFFIX:
            ac.autocomplete_exported(config, model_path)

    def __init__(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> None:
        self.name = config.name
        _check_types(config)
        if not model_path.is_file():
            raise ModelLoadError(
                f"model '{self.name}': model file {model_path} does not exist or is not a file; "
                "put the model in the version directory or set default_model_filename"
            )
        self._plan: RunPlan = plan_run(config, instance)
        self.exported = model_path.suffix == EXPORT_SUFFIX
        loader = _load_exported if self.exported else _load_torchscript
        module: Callable[..., Any] | None = loader(self.name, model_path, self._plan.device)
        self._module = module
        self.arguments = _forward_arguments(module)
        self._input_order = bind_inputs(config, self.arguments, model_path)
        self._outputs = {
            io.name: OutputBinding(io.name, _indexed(io.name), io.data_type) for io in config.output
        }
        logger.info(
            "loaded model '%s' instance %s from %s on %s",
            self.name,
            instance.name,
            model_path,
            self._plan.device,
        )

    @property
    def device(self) -> torch.device:
        return self._plan.device

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(
            torch.inference_mode() if self._plan.inference_mode else torch.no_grad()
        )
        if not self.exported:
            stack.enter_context(optimized_execution(self._plan.optimized_execution))
        return stack

    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        module = self._module
        if module is None:
            raise Unavailable(f"model '{self.name}' instance is unloaded")
        device = self._plan.device
        with self._context():
            args = [to_torch(inputs[name], device) for name in self._input_order]
            try:
                result = module(*args)
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise InternalError(f"model '{self.name}' failed while running: {reason}") from exc
            names = list(outputs) if outputs else list(self._outputs)
            return {name: self._output(result, name) for name in names}

    def _output(self, result: Any, name: str) -> Array:
        binding = self._outputs.get(name)
        if binding is None:
            raise InternalError(f"model '{self.name}': output '{name}' is not in its config")
        value = _select(self.name, result, binding)
        if not isinstance(value, torch.Tensor):
            raise InternalError(
                f"model '{self.name}': forward() gave {type(value).__name__} for output "
                f"'{name}', not a tensor; return tensors (in a tuple, list or dict)"
            )
        actual = TORCH_TO_CONFIG.get(value.dtype)
        if actual != binding.data_type:
            raise InternalError(
                f"model '{self.name}': output '{name}' is {value.dtype} but config.pbtxt "
                f"declares {mc.DataType.Name(binding.data_type)}; fix data_type in the config "
                "or cast the output in forward()"
            )
        return to_numpy(value)

    def unload(self) -> None:
        self._module = None
        if self._plan.device.type == "cuda":
            torch.cuda.empty_cache()


def _select(model: str, result: Any, binding: OutputBinding) -> Any:
    """The part of forward()'s result that one output names."""
    if isinstance(result, Mapping):
        if binding.name in result:
            return result[binding.name]
        raise InternalError(
            f"model '{model}': forward() returned a dict without key '{binding.name}' "
            f"(keys: {sorted(map(str, result))}); name the config output after a key"
        )
    items = [result] if isinstance(result, torch.Tensor) else result
    if binding.index is None:
        raise InternalError(
            f"model '{model}': output '{binding.name}' needs a '__<index>' suffix because "
            "forward() returns a tuple, list or tensor, not a dict"
        )
    if not isinstance(items, (list, tuple)) or binding.index >= len(items):
        count = len(items) if isinstance(items, (list, tuple)) else 0
        raise InternalError(
            f"model '{model}': output '{binding.name}' asks for result {binding.index} but "
            f"forward() returned {count}; use indices 0..{count - 1}"
        )
    return items[binding.index]
