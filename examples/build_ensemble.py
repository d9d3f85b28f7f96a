"""Build the ensemble example models: Triton ``platform: "ensemble"`` configs, served by
services/ensemble, which runs each step as a ModelInfer through the gateway.

``python -m examples.build_ensemble <dir>`` writes ``<dir>/<ensemble>/config.pbtxt`` plus the
empty version directory ``<dir>/<ensemble>/1/`` Triton expects, and the step models the chosen
ensembles need: the Python-backend ones of examples/build_python.py and the ONNX ones of
examples/build_repository.py (``python -m examples.build_repository`` builds everything).
Every ensemble batches with max_batch_size 8 (each step's is at least 8); dims below leave out
the batch dimension. a, b, x stand for the ensemble's inputs INPUT0, INPUT1 (INT32 [16]).

- ``image_classifier``: IMAGE BYTES [1] (an encoded PNG/JPEG) → LABELS BYTES [3], PROBS FP32 [3]:
  ``preprocess_image_python`` (IMAGE → PIXELS FP32 [3, 64, 64]) → ``cnn`` (INPUT0 → OUTPUT0
  FP32 [10]) → ``topk_python`` (SCORES → LABELS, PROBS: the 3 likeliest of cnn's labels).
- ``parallel_branches``: INPUT0 → ``slow_a_python`` → OUTPUT0 = 2x, and INPUT0 →
  ``slow_b_python`` → OUTPUT1 = x + 1, independent steps each sleeping 400 ms: run concurrently,
  the ensemble takes about one delay, not two.
- ``branch_join``: INPUT0 → ``slow_a_python`` (2x) and ``slow_b_python`` (x + 1), both into
  ``simple``: OUTPUT0 = 3x + 1, OUTPUT1 = x - 1 (about one delay too).
- ``chain3``: ``simple`` three times in a row, each step's (sum, difference) the next one's
  inputs: (a + b, a - b) → (2a, 2b) → OUTPUT0 = 2(a + b), OUTPUT1 = 2(a - b).
- ``nested_ensemble``: ``chain3`` (itself an ensemble) then ``simple``:
  OUTPUT0 = 4a, OUTPUT1 = 4b.
- ``repeat_then_simple`` (decoupled, so called with ModelStreamInfer): INPUT0 (INT32 [16]) and
  COUNT (UINT32 [1]) → ``repeat_count_python`` streams COUNT responses (response k: x and k) →
  ``simple`` runs once per response → one ensemble response per k: OUTPUT0 = x + k,
  OUTPUT1 = x - k (in the order the ``simple`` calls finish), then the FINAL flag. The ensemble's
  config does not say decoupled: it is filled in at load, as Triton does.

Rebuilding is idempotent, as for examples/build_repository.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from examples.build_python import EXAMPLES as PYTHON_EXAMPLES
from examples.build_python import build_python_repository
from examples.cli import builder_main, write_if_changed

#: the batch size every ensemble (and so every step) accepts
MAX_BATCH = 8


@dataclass(frozen=True, slots=True)
class Io:
    """One input or output of an ensemble, as its config declares it."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def text(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f'  {{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ] }}'


@dataclass(frozen=True, slots=True)
class Step:
    """One step: the model it runs and how its tensors map to the ensemble's tensors."""

    model: str
    #: the step model's input name → the ensemble tensor fed to it
    inputs: Mapping[str, str]
    #: the step model's output name → the ensemble tensor it produces
    outputs: Mapping[str, str]

    def text(self) -> str:
        maps = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in self.inputs.items()]
        maps += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in self.outputs.items()]
        lines = [f'      model_name: "{self.model}"', "      model_version: -1", *maps]
        return "    {\n" + "\n".join(lines) + "\n    }"


@dataclass(frozen=True, slots=True)
class Ensemble:
    """An ensemble model: its interface and its steps (a DAG over named tensors)."""

    name: str
    inputs: tuple[Io, ...]
    outputs: tuple[Io, ...]
    steps: tuple[Step, ...]

    def config(self) -> str:
        """The config.pbtxt text."""
        inputs = ",\n".join(io.text() for io in self.inputs)
        outputs = ",\n".join(io.text() for io in self.outputs)
        steps = ",\n".join(step.text() for step in self.steps)
        return (
            f'name: "{self.name}"\nplatform: "ensemble"\nmax_batch_size: {MAX_BATCH}\n'
            f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
            f"ensemble_scheduling {{\n  step [\n{steps}\n  ]\n}}\n"
        )


def _int32(name: str) -> Io:
    return Io(name, "TYPE_INT32", (16,))


def _simple(in0: str, in1: str, out0: str, out1: str) -> Step:
    """A step running ``simple``: (in0, in1) → (out0 = in0 + in1, out1 = in0 - in1)."""
    return Step("simple", {"INPUT0": in0, "INPUT1": in1}, {"OUTPUT0": out0, "OUTPUT1": out1})


_PAIR_IN = (_int32("INPUT0"), _int32("INPUT1"))
_PAIR_OUT = (_int32("OUTPUT0"), _int32("OUTPUT1"))

_ALL = (
    Ensemble(
        "image_classifier",
        (Io("IMAGE", "TYPE_STRING", (1,)),),
        (Io("LABELS", "TYPE_STRING", (3,)), Io("PROBS", "TYPE_FP32", (3,))),
        (
            Step("preprocess_image_python", {"IMAGE": "IMAGE"}, {"PIXELS": "pixels"}),
            Step("cnn", {"INPUT0": "pixels"}, {"OUTPUT0": "scores"}),
            Step("topk_python", {"SCORES": "scores"}, {"LABELS": "LABELS", "PROBS": "PROBS"}),
        ),
    ),
    Ensemble(
        "parallel_branches",
        (_int32("INPUT0"),),
        _PAIR_OUT,
        (
            Step("slow_a_python", {"INPUT0": "INPUT0"}, {"OUTPUT0": "OUTPUT0"}),
            Step("slow_b_python", {"INPUT0": "INPUT0"}, {"OUTPUT0": "OUTPUT1"}),
        ),
    ),
    Ensemble(
        "branch_join",
        (_int32("INPUT0"),),
        _PAIR_OUT,
        (
            Step("slow_a_python", {"INPUT0": "INPUT0"}, {"OUTPUT0": "doubled"}),
            Step("slow_b_python", {"INPUT0": "INPUT0"}, {"OUTPUT0": "incremented"}),
            _simple("doubled", "incremented", "OUTPUT0", "OUTPUT1"),
        ),
    ),
    Ensemble(
        "chain3",
        _PAIR_IN,
        _PAIR_OUT,
        (
            _simple("INPUT0", "INPUT1", "sum1", "diff1"),
            _simple("sum1", "diff1", "sum2", "diff2"),
            _simple("sum2", "diff2", "OUTPUT0", "OUTPUT1"),
        ),
    ),
    Ensemble(
        "nested_ensemble",
        _PAIR_IN,
        _PAIR_OUT,
        (
            Step(
                "chain3",
                {"INPUT0": "INPUT0", "INPUT1": "INPUT1"},
                {"OUTPUT0": "chain_sum", "OUTPUT1": "chain_diff"},
            ),
            _simple("chain_sum", "chain_diff", "OUTPUT0", "OUTPUT1"),
        ),
    ),
    Ensemble(
        "repeat_then_simple",
        (_int32("INPUT0"), Io("COUNT", "TYPE_UINT32", (1,))),
        _PAIR_OUT,
        (
            Step(
                "repeat_count_python",
                {"INPUT0": "INPUT0", "COUNT": "COUNT"},
                {"OUTPUT0": "repeated", "OUTPUT1": "index"},
            ),
            _simple("repeated", "index", "OUTPUT0", "OUTPUT1"),
        ),
    ),
)

#: ensemble name → its definition
ENSEMBLES: dict[str, Ensemble] = {e.name: e for e in _ALL}


@dataclass(frozen=True, slots=True)
class RequiredModels:
    """Every model a set of ensembles needs, by the builder that makes it."""

    #: the ensembles asked for and the ensembles they use as steps
    ensembles: tuple[str, ...]
    #: Python-backend steps (examples/build_python.py)
    python: tuple[str, ...]
    #: ONNX steps (examples/build_repository.py)
    onnx: tuple[str, ...]


def required_models(names: Iterable[str] | None = None) -> RequiredModels:
    """The named ensembles (all when None) and, transitively, every step model they run."""
    wanted = list(ENSEMBLES) if names is None else list(names)
    unknown = [n for n in wanted if n not in ENSEMBLES]
    if unknown:
        raise ValueError(f"unknown ensemble example(s) {unknown}; choose from {sorted(ENSEMBLES)}")
    ensembles: list[str] = []
    steps: list[str] = []
    pending = list(reversed(wanted))
    while pending:
        name = pending.pop()
        if name in ensembles:
            continue
        ensembles.append(name)
        for step in ENSEMBLES[name].steps:
            if step.model in ENSEMBLES:
                pending.append(step.model)
            elif step.model not in steps:
                steps.append(step.model)
    return RequiredModels(
        ensembles=tuple(ensembles),
        python=tuple(m for m in steps if m in PYTHON_EXAMPLES),
        onnx=tuple(m for m in steps if m not in PYTHON_EXAMPLES),
    )


def build_ensemble_repository(
    root: Path, names: Iterable[str] | None = None, *, steps: bool = True
) -> None:
    """Write the named ensembles (all when None), the ensembles they nest and, unless ``steps``
    is False (the caller builds them), the Python and ONNX models their steps run."""
    needed = required_models(names)
    if steps:
        build_python_repository(root, needed.python)
        if needed.onnx:
            from examples.build_repository import build_repository  # needs onnx

            build_repository(root, needed.onnx)
    for name in needed.ensembles:
        write_if_changed(root / name / "config.pbtxt", ENSEMBLES[name].config())
        (root / name / "1").mkdir(parents=True, exist_ok=True)


def write_gateway_routed_copy(root: Path, name: str) -> str:
    """A copy of ensemble ``name`` in ``root`` whose steps go through the gateway
    (``step_routing: gateway``), named ``<name>_via_gateway``; returns that name."""
    copy = f"{name}_via_gateway"
    config = (root / name / "config.pbtxt").read_text()
    (root / copy / "1").mkdir(parents=True, exist_ok=True)
    write_if_changed(
        root / copy / "config.pbtxt",
        config.replace(f'"{name}"', f'"{copy}"', 1)
        + 'parameters { key: "step_routing" value: { string_value: "gateway" } }\n',
    )
    return copy


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build these ensembles and their step models into a repository directory."""
    return builder_main(
        argv,
        prog="python -m examples.build_ensemble",
        description="Build the ensemble example models (Triton ensemble configs) and their steps.",
        names=ENSEMBLES,
        build=build_ensemble_repository,
        label="ensemble example models (with their step models)",
    )


if __name__ == "__main__":
    sys.exit(main())
