"""An ensemble's step graph: read from ``ensemble_scheduling``, checked once at load.

Each step maps ensemble tensors to its model's inputs (``input_map``: model input → ensemble
tensor) and its model's outputs to new ensemble tensors (``output_map``: model output → ensemble
tensor). A step can run as soon as every tensor it reads exists; steps that do not depend on
each other run concurrently.

``build_graph`` raises ModelLoadError naming the offending step for every mistake Triton users
make: an unknown step model, a tensor nobody produces, a tensor produced twice, an unmapped
required input, an unknown input/output name, a cycle (also through nested ensembles), and a
datatype, shape or batching mismatch between a producer and its consumers. What a step model's
config does not declare (a model whose config is auto-completed at load) is not checked here;
the step's own service rejects a bad call at run time, and the error names the step.

Decoupled steps (``model_transaction_policy { decoupled: true }``: any number of responses per
request), as Triton's ensemble scheduler treats them (triton-inference-server/core,
src/ensemble_scheduler/ensemble_utils.cc ``ValidateEnsembleConfig`` and ensemble_scheduler.cc):

- each response of a decoupled step is a separate set of its output tensors, and every step
  reading them runs once per response, on that response's tensors alone;
- so a step may only combine tensors that come from the same response: Triton labels every tensor
  with the decoupled step it descends from (none for the ensemble's inputs) and refuses a step
  whose inputs carry different labels ("receives inputs originated from different decoupled
  models"); the ensemble's outputs, which form one ensemble response, must agree the same way;
- the ensemble is decoupled exactly when one of its steps is (also through a nested ensemble):
  Triton fills the ensemble's ``model_transaction_policy.decoupled`` itself at load, the user
  need not write it (``is_decoupled``; EnsembleRuntime.autocomplete sets it). Clients then call
  the ensemble with ModelStreamInfer, as any decoupled model.

``Step.origin`` is that label: the index of the decoupled step whose responses the step runs
once for, or None when it runs once per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes
from services.core.config import ENSEMBLE_PLATFORM
from services.core.errors import ModelLoadError

#: step model name → its config (None: no such model); a config with no inputs and no outputs
#: means "exists, interface unknown"
ConfigLookup = Callable[[str], "mc.ModelConfig | None"]
#: builds the load error for a problem description
_Fail = Callable[[str], ModelLoadError]


@dataclass(frozen=True, slots=True)
class Step:
    index: int
    model_name: str
    #: "" = the version policy's choice (model_version -1, or 0: unset; versions start at 1)
    model_version: str
    #: (step model input name, ensemble tensor it reads)
    inputs: tuple[tuple[str, str], ...]
    #: (step model output name, ensemble tensor it writes)
    outputs: tuple[tuple[str, str], ...]
    #: the step model is decoupled (called with ModelStreamInfer; any number of responses)
    decoupled: bool = False
    #: the decoupled step whose each response runs this step once (None: once per request)
    origin: int | None = None

    @property
    def label(self) -> str:
        return f"step {self.index} (model '{self.model_name}')"

    @property
    def reads(self) -> frozenset[str]:
        return frozenset(t for _, t in self.inputs)


@dataclass(frozen=True, slots=True)
class EnsembleGraph:
    name: str
    steps: tuple[Step, ...]
    #: ensemble input name → Triton datatype
    input_types: dict[str, str]
    #: ensemble output names, in config order
    outputs: tuple[str, ...]
    #: some step is decoupled: the ensemble streams its responses (see the module docstring)
    decoupled: bool = False
    #: the decoupled step each of whose responses yields one set of ensemble outputs (None: the
    #: request yields one)
    output_origin: int | None = None
    #: ``ensemble_scheduling.max_inflight_requests``: per request, how many flows a decoupled
    #: step's responses may have running at once before its stream is read on (0: no limit)
    max_inflight_requests: int = 0


@dataclass(frozen=True, slots=True)
class _Spec:
    """What is known of a tensor: datatype and full shape (batch dimension as -1)."""

    datatype: str
    shape: tuple[int, ...]
    origin: str


def build_graph(config: mc.ModelConfig, lookup: ConfigLookup) -> EnsembleGraph:
    """Check the ensemble against its step models' configs; raise ModelLoadError on a mistake."""
    name = config.name
    steps = tuple(
        Step(
            index=i,
            model_name=s.model_name,
            model_version="" if s.model_version <= 0 else str(s.model_version),
            inputs=tuple(sorted(s.input_map.items())),
            outputs=tuple(sorted(s.output_map.items())),
        )
        for i, s in enumerate(config.ensemble_scheduling.step)
    )

    def fail(problem: str) -> ModelLoadError:
        return ModelLoadError(f"ensemble '{name}': {problem}")

    configs: dict[int, mc.ModelConfig] = {}
    for step in steps:
        if step.model_name == name:
            raise fail(f"{step.label} calls the ensemble itself")
        found = lookup(step.model_name)
        if found is None:
            raise fail(f"{step.label}: no model named '{step.model_name}' in the repository")
        configs[step.index] = found
        if _reaches(step.model_name, name, lookup, set()):
            raise fail(f"{step.label} is an ensemble that calls '{name}' back: a cycle")

    batched = config.max_batch_size > 0
    specs: dict[str, _Spec] = {
        i.name: _Spec(
            dtypes.triton_from_config(i.data_type),
            _full_shape(batched, i.dims),
            f"ensemble input '{i.name}'",
        )
        for i in config.input
    }
    producer: dict[str, Step] = {}
    for step in steps:
        for _, tensor in step.outputs:
            if tensor in specs and tensor not in producer:
                raise fail(f"{step.label} writes tensor '{tensor}', which is an ensemble input")
            if tensor in producer:
                raise fail(
                    f"tensor '{tensor}' is written by both {producer[tensor].label} and "
                    f"{step.label}; each tensor needs exactly one producer"
                )
            producer[tensor] = step
        _check_names(step, configs[step.index], config, fail)

    available = set(specs) | set(producer)
    for step in steps:
        for model_input, tensor in step.inputs:
            if tensor not in available:
                raise fail(
                    f"{step.label} reads tensor '{tensor}' (for its input '{model_input}'), "
                    "which is neither an ensemble input nor any step's output"
                )
    for out in config.output:
        if out.name not in producer:
            raise fail(f"ensemble output '{out.name}' is not written by any step")
    used = {t for s in steps for t in s.reads}
    for i in config.input:
        if i.name not in used:
            raise fail(f"ensemble input '{i.name}' is not read by any step")

    order = _topological(steps, producer, fail)
    for step in order:
        step_config = configs[step.index]
        if not _declares_io(step_config):
            continue
        step_batched = step_config.max_batch_size > 0
        if batched and step_config.max_batch_size < config.max_batch_size:
            raise fail(
                f"{step.label} has max_batch_size {step_config.max_batch_size}, below the "
                f"ensemble's {config.max_batch_size}; raise the step's or lower the ensemble's"
            )
        if not batched and step_batched:
            raise fail(
                f"{step.label} batches (max_batch_size {step_config.max_batch_size}) but the "
                "ensemble does not (max_batch_size 0); give the ensemble a max_batch_size"
            )
        model_inputs = {i.name: i for i in step_config.input}
        for model_input, tensor in step.inputs:
            known = specs.get(tensor)
            decl = model_inputs.get(model_input)
            if known is None or decl is None:
                continue
            want = _Spec(
                dtypes.triton_from_config(decl.data_type),
                _full_shape(step_batched, decl.dims),
                f"{step.label} input '{model_input}'",
            )
            _check_match(known, want, tensor, fail)
        model_outputs = {o.name: o for o in step_config.output}
        for model_output, tensor in step.outputs:
            decl_out = model_outputs.get(model_output)
            if decl_out is not None:
                specs[tensor] = _Spec(
                    dtypes.triton_from_config(decl_out.data_type),
                    _full_shape(step_batched, decl_out.dims),
                    f"{step.label} output '{model_output}'",
                )
    for out in config.output:
        known = specs.get(out.name)
        if known is not None:
            want = _Spec(
                dtypes.triton_from_config(out.data_type),
                _full_shape(batched, out.dims),
                f"ensemble output '{out.name}'",
            )
            _check_match(known, want, out.name, fail)

    order, output_origin = _origins(order, config, lookup, fail)
    return EnsembleGraph(
        name=name,
        steps=tuple(order),
        input_types={i.name: dtypes.triton_from_config(i.data_type) for i in config.input},
        outputs=tuple(o.name for o in config.output),
        decoupled=any(s.decoupled for s in order),
        output_origin=output_origin,
        max_inflight_requests=config.ensemble_scheduling.max_inflight_requests,
    )


def is_decoupled(config: mc.ModelConfig, lookup: ConfigLookup) -> bool:
    """Whether an ensemble is decoupled: one of its steps is (Triton's rule, module docstring)."""
    return any(
        _decoupled_model(s.model_name, lookup, {config.name})
        for s in config.ensemble_scheduling.step
    )


def _decoupled_model(model: str, lookup: ConfigLookup, seen: set[str]) -> bool:
    """Whether ``model`` answers a request with any number of responses: its config says so, or
    it is an ensemble with such a step (a config read from its file does not say so yet)."""
    config = lookup(model)
    if config is None or model in seen:
        return False
    if config.model_transaction_policy.decoupled:
        return True
    if config.platform != ENSEMBLE_PLATFORM:
        return False
    return any(
        _decoupled_model(s.model_name, lookup, seen | {model})
        for s in config.ensemble_scheduling.step
    )


def _origins(
    order: Sequence[Step], config: mc.ModelConfig, lookup: ConfigLookup, fail: _Fail
) -> tuple[list[Step], int | None]:
    """Each step with its decoupled flag and origin (steps in dependency order), and the origin of
    the ensemble outputs; refuses a step or an output set mixing tensors of different origins."""
    by_index = {s.index: s for s in order}
    origin_of: dict[str, int | None] = {i.name: None for i in config.input}

    def describe(tensor: str) -> str:
        origin = origin_of[tensor]
        if origin is None:
            return f"'{tensor}' (once per request)"
        return f"'{tensor}' (once per response of decoupled {by_index[origin].label})"

    def common(tensors: Sequence[str], reader: str) -> int | None:
        origins = {origin_of[t] for t in tensors}
        if len(origins) > 1:
            raise fail(
                f"{reader} combines tensors of different decoupled responses: "
                f"{', '.join(describe(t) for t in tensors)}. Each response of a decoupled step "
                "runs the steps after it on its own, so what is combined must come from the "
                "same response (Triton: inputs originated from different decoupled models)"
            )
        return next(iter(origins), None)

    placed: list[Step] = []
    for step in order:
        decoupled = _decoupled_model(step.model_name, lookup, {config.name})
        origin = common(sorted(step.reads), step.label)
        for _, tensor in step.outputs:
            origin_of[tensor] = step.index if decoupled else origin
        placed.append(replace(step, decoupled=decoupled, origin=origin))
    if any(s.decoupled for s in placed) and not config.model_transaction_policy.decoupled:
        first = next(s for s in placed if s.decoupled)
        raise fail(
            f"{first.label} is decoupled (any number of responses per request), so the "
            "ensemble is too: set model_transaction_policy { decoupled: true } in its config "
            "(filled in at load when the step's config says so) and call it with ModelStreamInfer"
        )
    output_origin = common([o.name for o in config.output], "the ensemble's output set")
    return placed, output_origin


def _declares_io(config: mc.ModelConfig) -> bool:
    return bool(config.input) or bool(config.output)


def _full_shape(batched: bool, dims: Sequence[int]) -> tuple[int, ...]:
    return ((-1,) if batched else ()) + tuple(int(d) for d in dims)


def _check_names(
    step: Step, step_config: mc.ModelConfig, ensemble: mc.ModelConfig, fail: _Fail
) -> None:
    if not _declares_io(step_config):
        return
    inputs = {i.name: i for i in step_config.input}
    outputs = {o.name for o in step_config.output}
    for model_input, _ in step.inputs:
        if model_input not in inputs:
            raise fail(
                f"{step.label} maps '{model_input}', which is not an input of "
                f"'{step.model_name}' (its inputs: {', '.join(sorted(inputs)) or 'none'})"
            )
    for model_output, _ in step.outputs:
        if model_output not in outputs:
            raise fail(
                f"{step.label} maps '{model_output}', which is not an output of "
                f"'{step.model_name}' (its outputs: {', '.join(sorted(outputs)) or 'none'})"
            )
    mapped = {m for m, _ in step.inputs}
    for decl in step_config.input:
        if decl.name not in mapped and not decl.optional:
            raise fail(f"{step.label} leaves the model's required input '{decl.name}' unmapped")


def _check_match(have: _Spec, want: _Spec, tensor: str, fail: _Fail) -> None:
    if have.datatype != want.datatype:
        raise fail(
            f"{want.origin} expects {want.datatype} but tensor '{tensor}' from {have.origin} "
            f"is {have.datatype}"
        )
    compatible = len(have.shape) == len(want.shape) and all(
        a == b or a == -1 or b == -1 for a, b in zip(have.shape, want.shape, strict=True)
    )
    if not compatible:
        raise fail(
            f"{want.origin} expects shape {list(want.shape)} but tensor '{tensor}' from "
            f"{have.origin} has shape {list(have.shape)} (-1: any size, batch dimension first)"
        )


def _topological(steps: Sequence[Step], producer: dict[str, Step], fail: _Fail) -> list[Step]:
    """Steps in an order where every step comes after the producers of what it reads."""
    deps = {s.index: {producer[t].index for t in s.reads if t in producer} for s in steps}
    done: list[Step] = []
    placed: set[int] = set()
    while len(done) < len(steps):
        ready = [s for s in steps if s.index not in placed and deps[s.index] <= placed]
        if not ready:
            raise fail(f"steps form a cycle: {_cycle(steps, deps, placed)}")
        for s in ready:
            done.append(s)
            placed.add(s.index)
    return done


def _cycle(steps: Sequence[Step], deps: dict[int, set[int]], placed: set[int]) -> str:
    """One cycle among the steps not placed, as 'step a (...) → step b (...) → step a (...)'."""
    by_index = {s.index: s for s in steps}
    start = next(s.index for s in steps if s.index not in placed)
    path: list[int] = []
    current = start
    while current not in path:
        path.append(current)
        current = min(d for d in deps[current] if d not in placed)
    loop = [*path[path.index(current) :], current]
    return " → ".join(by_index[i].label for i in reversed(loop))


def _reaches(model: str, target: str, lookup: ConfigLookup, seen: set[str]) -> bool:
    """Whether ensemble ``model`` calls ``target`` through its (nested) steps."""
    if model in seen:
        return False
    seen.add(model)
    config = lookup(model)
    if config is None or config.platform != ENSEMBLE_PLATFORM:
        return False
    return any(
        s.model_name == target or _reaches(s.model_name, target, lookup, seen)
        for s in config.ensemble_scheduling.step
    )
