"""Build the PyTorch example models from code: TorchScript and torch.export twins of the ONNX ones.

``python -m examples.build_torch <dir>`` writes Triton-layout models served by services/torch:

- ``simple_torch``: INT32 INPUT__0/INPUT__1 [16] → OUTPUT__0 sum, OUTPUT__1 difference
  (TorchScript; Triton's ``simple`` with the PyTorch backend's tensor names);
- ``mlp_torch``: FP32 INPUT__0 [256] → 1024 → 1024 → 10 OUTPUT__0 (TorchScript);
- ``cnn_torch``: a small ResNet-style net, FP32 [3, 64, 64] → 10 (TorchScript);
- ``mlp_torch_export``: the same MLP as a torch.export program (``model.pt2``) with a dynamic
  batch dimension, selected by ``default_model_filename: "model.pt2"``;
- ``dtypes_torch``: identity per datatype for the conformance suite (TorchScript): input
  ``IN_<DTYPE>`` [-1] (a forward() argument of that name) → output ``OUT_<DTYPE>`` (the key of
  the returned dict), for every datatype of DTYPES_DATATYPES: all of Triton's but BYTES, which
  has no torch tensor type; max_batch_size 8;
- ``simple_sequence_torch``: the stateful accumulator (Triton's ``simple_sequence``, served by the
  sequence batcher; TorchScript): INT32 INPUT__0 [1] → OUTPUT__0, the running sum of the
  sequence. As Triton's PyTorch backend wants, the control inputs and the implicit state are
  named ``<name>__<index>``, the index being their place among forward()'s arguments or in its
  returned tuple: START__1, READY__2, state ACC_IN__3 → ACC_OUT__1;
- ``simple_ragged_torch``: ragged batching (TorchScript): FP32 INPUT__0 [-1] of any length per
  request → SUM__0 per item and SCALED__1, the values doubled; forward() gets the batch's values
  as one 1-D run and LENGTHS__1, each item's count, which the server makes
  (BATCH_ITEM_SHAPE_FLATTEN).

Weights come from fixed seeds, so every build gives the same numbers; ``mlp_module()`` etc.
return the eager modules for tests to compare against. A file whose bytes would not change is
left untouched; a changed one is replaced atomically.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from examples.cli import TRITON_DATATYPES, builder_main, write_if_changed
from examples.ragged_config import ragged_config

SEED = 20261121
MAX_BATCH = 64
CNN_LABELS = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class SimpleAddSub(nn.Module):
    """Sum and difference of two tensors (Triton's ``simple``)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a - b


#: the datatypes of ``dtypes_torch``, in its forward()'s argument order
DTYPES_DATATYPES = tuple(d for d in TRITON_DATATYPES if d != "BYTES")


class DtypesIdentity(nn.Module):
    """Returns every input unchanged, as the entry ``OUT_<DTYPE>`` of a dict."""

    def forward(
        self,
        IN_BOOL: torch.Tensor,  # noqa: N803 - the arguments are the config's input names
        IN_UINT8: torch.Tensor,  # noqa: N803
        IN_UINT16: torch.Tensor,  # noqa: N803
        IN_UINT32: torch.Tensor,  # noqa: N803
        IN_UINT64: torch.Tensor,  # noqa: N803
        IN_INT8: torch.Tensor,  # noqa: N803
        IN_INT16: torch.Tensor,  # noqa: N803
        IN_INT32: torch.Tensor,  # noqa: N803
        IN_INT64: torch.Tensor,  # noqa: N803
        IN_FP16: torch.Tensor,  # noqa: N803
        IN_FP32: torch.Tensor,  # noqa: N803
        IN_FP64: torch.Tensor,  # noqa: N803
        IN_BF16: torch.Tensor,  # noqa: N803
    ) -> dict[str, torch.Tensor]:
        return {
            "OUT_BOOL": IN_BOOL,
            "OUT_UINT8": IN_UINT8,
            "OUT_UINT16": IN_UINT16,
            "OUT_UINT32": IN_UINT32,
            "OUT_UINT64": IN_UINT64,
            "OUT_INT8": IN_INT8,
            "OUT_INT16": IN_INT16,
            "OUT_INT32": IN_INT32,
            "OUT_INT64": IN_INT64,
            "OUT_FP16": IN_FP16,
            "OUT_FP32": IN_FP32,
            "OUT_FP64": IN_FP64,
            "OUT_BF16": IN_BF16,
        }


class SequenceAccumulator(nn.Module):
    """The running sum of a sequence (Triton's ``simple_sequence``): the server feeds START and
    READY (0 / 1) and the state ``acc_in`` (what the sequence's previous request returned as
    its second result; zeros at START)."""

    def forward(
        self, value: torch.Tensor, start: torch.Tensor, ready: torch.Tensor, acc_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        acc_out = value * ready + acc_in * (1 - start)
        return acc_out, acc_out


class RaggedSum(nn.Module):
    """Per batch item, the sum of its slice of the flat values, and the values doubled."""

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = lengths.shape[0]
        items = torch.repeat_interleave(torch.arange(count, device=lengths.device), lengths.long())
        sums = torch.zeros(count, dtype=values.dtype, device=values.device)
        return sums.index_add_(0, items, values).unsqueeze(1), values * 2


class _Block(nn.Module):
    """A ResNet basic block: two 3x3 conv-BN layers plus the (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


def mlp_module(seed: int = SEED) -> nn.Module:
    """FP32 [256] → 1024 → 1024 → 10, ReLU between (eval mode)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    ).eval()


def cnn_module(seed: int = SEED + 1) -> nn.Module:
    """ResNet-style: stem 3→32 (stride 2), blocks 32→32, 32→64 (/2), 64→128 (/2), pool, fc 10."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        _Block(32, 32, 1),
        _Block(32, 64, 2),
        _Block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    ).eval()


@dataclass(frozen=True, slots=True)
class TorchExample:
    """One model directory: config text, the model file's name and bytes, and extra files."""

    config: str
    filename: str
    model: bytes
    extra_files: dict[str, str]


def _script_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def _io(kind: str, name: str, type_name: str, dims: Sequence[int], extra: str = "") -> str:
    dim_text = ", ".join(str(d) for d in dims)
    return (
        f'  {{\n    name: "{name}"\n    data_type: {type_name}\n    dims: [ {dim_text} ]\n'
        f"{extra}  }}"
    )


def _config(
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    max_batch: int,
    delay_us: int,
    extra: str = "",
) -> str:
    return (
        f'name: "{name}"\nplatform: "pytorch_libtorch"\nmax_batch_size: {max_batch}\n'
        f"{extra}input [\n" + ",\n".join(inputs) + "\n]\n"
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n}}\n"
    )


def build_simple() -> TorchExample:
    """INT32 INPUT__0/INPUT__1 [16] → OUTPUT__0 = sum, OUTPUT__1 = difference."""
    inputs = [_io("input", f"INPUT__{i}", "TYPE_INT32", [16]) for i in range(2)]
    outputs = [_io("output", f"OUTPUT__{i}", "TYPE_INT32", [16]) for i in range(2)]
    config = _config("simple_torch", inputs, outputs, 8, 0)
    return TorchExample(config, "model.pt", _script_bytes(SimpleAddSub()), {})


def _dense_config(name: str, input_dims: Sequence[int], delay_us: int, extra: str = "") -> str:
    labels = '    label_filename: "labels.txt"\n' if name.startswith("cnn") else ""
    return _config(
        name,
        [_io("input", "INPUT__0", "TYPE_FP32", input_dims)],
        [_io("output", "OUTPUT__0", "TYPE_FP32", [10], labels)],
        MAX_BATCH,
        delay_us,
        extra,
    )


def build_mlp() -> TorchExample:
    """The MLP as TorchScript."""
    return TorchExample(
        _dense_config("mlp_torch", [256], 100), "model.pt", _script_bytes(mlp_module()), {}
    )


def build_cnn() -> TorchExample:
    """The ResNet-style CNN as TorchScript, with class labels for the classification extension."""
    labels = {"labels.txt": "\n".join(CNN_LABELS) + "\n"}
    config = _dense_config("cnn_torch", [3, 64, 64], 2000)
    return TorchExample(config, "model.pt", _script_bytes(cnn_module()), labels)


def build_mlp_export() -> TorchExample:
    """The MLP as a torch.export program with a dynamic batch dimension (1..MAX_BATCH)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = (torch.zeros(2, 256),)
    program = torch.export.export(mlp_module(), example, dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    config = _dense_config(
        "mlp_torch_export", [256], 100, extra='default_model_filename: "model.pt2"\n'
    )
    return TorchExample(config, "model.pt2", buffer.getvalue(), {})


def build_dtypes() -> TorchExample:
    """IN_<DTYPE> [-1] → OUT_<DTYPE> unchanged, one pair per datatype of DTYPES_DATATYPES."""
    inputs = [_io("input", f"IN_{d}", f"TYPE_{d}", [-1]) for d in DTYPES_DATATYPES]
    outputs = [_io("output", f"OUT_{d}", f"TYPE_{d}", [-1]) for d in DTYPES_DATATYPES]
    config = _config("dtypes_torch", inputs, outputs, 8, 0)
    return TorchExample(config, "model.pt", _script_bytes(DtypesIdentity()), {})


SEQUENCE_CONFIG = """name: "simple_sequence_torch"
platform: "pytorch_libtorch"
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [
    { name: "START__1" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "READY__2" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] }
  ]
  state [
    { input_name: "ACC_IN__3" output_name: "ACC_OUT__1" data_type: TYPE_INT32 dims: [ 1 ] }
  ]
}
"""


def build_sequence() -> TorchExample:
    """The stateful accumulator: INPUT__0 → OUTPUT__0, the sum of the sequence's INPUT__0s."""
    return TorchExample(SEQUENCE_CONFIG, "model.pt", _script_bytes(SequenceAccumulator()), {})


#: simple_ragged_torch's (values, batch input, sum, scaled): forward()'s arguments and results
RAGGED_NAMES = ("INPUT__0", "LENGTHS__1", "SUM__0", "SCALED__1")


def build_ragged() -> TorchExample:
    """Ragged batching: INPUT__0 of any length → SUM__0 per item, SCALED__1 (see RaggedSum)."""
    config = ragged_config(
        "simple_ragged_torch", "pytorch_libtorch", "BATCH_ITEM_SHAPE_FLATTEN", RAGGED_NAMES
    )
    return TorchExample(config, "model.pt", _script_bytes(RaggedSum()), {})


BUILDERS: dict[str, Callable[[], TorchExample]] = {
    "simple_torch": build_simple,
    "mlp_torch": build_mlp,
    "cnn_torch": build_cnn,
    "mlp_torch_export": build_mlp_export,
    "dtypes_torch": build_dtypes,
    "simple_sequence_torch": build_sequence,
    "simple_ragged_torch": build_ragged,
}


def write_model(root: Path, name: str, example: TorchExample) -> None:
    """Write one model directory: config.pbtxt, 1/<model file> and extra files."""
    model_dir = root / name
    write_if_changed(model_dir / "config.pbtxt", example.config.encode())
    write_if_changed(model_dir / "1" / example.filename, example.model)
    for filename, text in example.extra_files.items():
        write_if_changed(model_dir / filename, text.encode())


def build_torch_repository(root: Path, names: Iterable[str] | None = None) -> None:
    """Build the named torch example models (all when ``names`` is None) under ``root``."""
    wanted = list(BUILDERS) if names is None else list(names)
    unknown = [n for n in wanted if n not in BUILDERS]
    if unknown:
        raise ValueError(
            f"unknown torch example model(s) {unknown}; choose from {sorted(BUILDERS)}"
        )
    root.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        write_model(root, name, BUILDERS[name]())


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build these examples into a repository directory."""
    return builder_main(
        argv,
        prog="python -m examples.build_torch",
        description="Build the PyTorch example models (TorchScript and torch.export).",
        names=BUILDERS,
        build=build_torch_repository,
        label="torch example models",
    )


if __name__ == "__main__":
    sys.exit(main())
