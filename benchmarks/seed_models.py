"""The seed benchmark's models: ResNet-50 with random weights, once per framework family.

``build_seed_repository(root, families)`` writes a Triton-layout repository that
``benchmarks/seed.py`` serves and also runs in-process:

- ``resnet50_torch`` (``pytorch_libtorch``, ``1/model.pt``): ResNet-50 (v1.5: bottleneck blocks
  [3, 4, 6, 3], stride on the 3x3 conv) written in plain torch, TorchScript-scripted;
  FP32 INPUT__0 [3, 224, 224] → OUTPUT__0 [1000] logits;
- ``resnet50_onnx`` (``onnxruntime_onnx``, ``1/model.onnx``): the same torch module exported
  with ``torch.onnx.export`` (opset 17, dynamic batch); FP32 INPUT0 [3, 224, 224] → OUTPUT0;
- ``resnet50_tf`` (``tensorflow_savedmodel``, ``1/model.savedmodel/``):
  ``keras.applications.ResNet50(weights=None)`` saved with a ``serving_default`` signature;
  FP32 INPUT0 [224, 224, 3] (NHWC, Keras's layout) → OUTPUT0 [1000] softmax;
- ``resnet50_python`` (``backend: "python"``, ``1/model.py`` + ``1/model.pt``): a Triton Python
  model whose ``execute`` runs the TorchScript model above with torch, the way a user wraps a
  native model in the Python backend; FP32 INPUT0 [3, 224, 224] → OUTPUT0 [1000].

All four: max_batch_size 32, one CPU instance, no dynamic batching (as the seed comparison ran).
Weights come from fixed seeds, so every build computes the same numbers. Each family's framework
is imported only when its model is built.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20261121
MAX_BATCH = 32
IMAGE = 224
CLASSES = 1000
FAMILIES = ("torch", "onnx", "tensorflow", "python")


@dataclass(frozen=True, slots=True)
class SeedModel:
    """One served model of the benchmark: its name, tensor names and per-image input shape."""

    family: str
    name: str
    input_name: str
    output_name: str
    image_shape: tuple[int, ...]

    @property
    def channels_last(self) -> bool:
        """True for NHWC inputs (the TensorFlow model)."""
        return self.image_shape[-1] == 3


MODELS: dict[str, SeedModel] = {
    "torch": SeedModel("torch", "resnet50_torch", "INPUT__0", "OUTPUT__0", (3, IMAGE, IMAGE)),
    "onnx": SeedModel("onnx", "resnet50_onnx", "INPUT0", "OUTPUT0", (3, IMAGE, IMAGE)),
    "tensorflow": SeedModel("tensorflow", "resnet50_tf", "INPUT0", "OUTPUT0", (IMAGE, IMAGE, 3)),
    "python": SeedModel("python", "resnet50_python", "INPUT0", "OUTPUT0", (3, IMAGE, IMAGE)),
}

#: how each family's config names its framework
_FRAMEWORK = {
    "torch": 'platform: "pytorch_libtorch"',
    "onnx": 'platform: "onnxruntime_onnx"',
    "tensorflow": 'platform: "tensorflow_savedmodel"',
    "python": 'backend: "python"',
}

PYTHON_MODEL = '''"""ResNet-50 (TorchScript, model.pt beside this file) run with torch in execute.

The way a user serves a native model through the Python backend: load it in initialize, convert
each request's numpy input to a tensor, run it under inference_mode, return numpy.
"""

import os

import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        directory = os.path.join(args["model_repository"], args["model_version"])
        self.module = torch.jit.load(os.path.join(directory, "model.pt"), map_location="cpu")
        self.module.eval()

    def execute(self, requests):
        responses = []
        with torch.inference_mode():
            for request in requests:
                images = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                scores = self.module(torch.from_numpy(images)).numpy()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", scores)]))
        return responses
'''


def config_text(model: SeedModel) -> str:
    """config.pbtxt: max_batch_size 32, one CPU instance, no dynamic_batching block."""
    dims = ", ".join(str(d) for d in model.image_shape)
    return (
        f'name: "{model.name}"\n{_FRAMEWORK[model.family]}\nmax_batch_size: {MAX_BATCH}\n'
        f'input [ {{ name: "{model.input_name}" data_type: TYPE_FP32 dims: [ {dims} ] }} ]\n'
        f'output [ {{ name: "{model.output_name}" data_type: TYPE_FP32 dims: [ {CLASSES} ] }} ]\n'
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
    )


# --- torch: ResNet-50 in plain torch --------------------------------------------------------------


def resnet50_module(seed: int = SEED) -> Any:
    """ResNet-50 v1.5 (torchvision's layout) with random weights from ``seed``, in eval mode."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        """1x1 reduce, 3x3 (carries the stride), 1x1 expand x4, plus the (projected) shortcut."""

        def __init__(self, c_in: int, width: int, stride: int) -> None:
            super().__init__()
            c_out = width * 4
            self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(c_out)
            self.shortcut: nn.Module = (
                nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                if stride != 1 or c_in != c_out
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return torch.relu(y + self.shortcut(x))

    torch.manual_seed(seed)
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    c_in = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(c_in, width, stride if i == 0 else 1))
            c_in = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, CLASSES)]
    net = nn.Sequential(*layers)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):  # torchvision's init keeps activations in range
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return net.eval()


def _torchscript_bytes(module: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def _write_onnx(path: Path, module: Any, model: SeedModel) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(1, *model.image_shape),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,  # the torch.export-based exporter needs onnxscript, not installed here
            input_names=[model.input_name],
            output_names=[model.output_name],
            dynamic_axes={model.input_name: {0: "batch"}, model.output_name: {0: "batch"}},
            opset_version=17,
        )


# --- TensorFlow: Keras's ResNet50 as a SavedModel -------------------------------------------------


def _save_tensorflow(path: Path, model: SeedModel, seed: int = SEED) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # type: ignore[import-untyped]  # no py.typed
    import tensorflow as tf  # type: ignore[import-untyped]  # no py.typed

    keras.utils.set_random_seed(seed)
    spec = tf.TensorSpec([None, *model.image_shape], tf.float32)

    class Serving(tf.Module):  # type: ignore[misc]  # tf.Module is untyped (Any)
        def __init__(self) -> None:
            super().__init__()
            self.net = keras.applications.ResNet50(weights=None, input_shape=model.image_shape)

        @tf.function(input_signature=[spec])  # type: ignore[untyped-decorator]  # untyped in TF
        def serve(self, INPUT0: Any) -> dict[str, Any]:  # noqa: N803 - the signature key
            return {"OUTPUT0": self.net(INPUT0, training=False)}

    serving = Serving()
    tf.saved_model.save(serving, str(path), signatures={"serving_default": serving.serve})


# --- writing the repository -----------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_seed_repository(root: Path, families: Iterable[str] = FAMILIES) -> list[SeedModel]:
    """Write the chosen families' models under ``root`` (replacing old ones); return them."""
    wanted = list(families)
    unknown = [f for f in wanted if f not in MODELS]
    if unknown:
        raise ValueError(f"unknown famil(ies) {unknown}; choose from {list(FAMILIES)}")
    root.mkdir(parents=True, exist_ok=True)
    torchscript: bytes | None = None
    module: Any = None
    if {"torch", "onnx", "python"} & set(wanted):
        module = resnet50_module()
        torchscript = _torchscript_bytes(module)
    built = []
    for family in wanted:
        model = MODELS[family]
        model_dir = root / model.name
        shutil.rmtree(model_dir, ignore_errors=True)
        version = model_dir / "1"
        if family == "torch" and torchscript is not None:
            _write(version / "model.pt", torchscript)
        elif family == "python" and torchscript is not None:
            _write(version / "model.pt", torchscript)
            _write(version / "model.py", PYTHON_MODEL.encode())
        elif family == "onnx":
            _write_onnx(version / "model.onnx", module, model)
        elif family == "tensorflow":
            version.mkdir(parents=True)
            _save_tensorflow(version / "model.savedmodel", model)
        _write(model_dir / "config.pbtxt", config_text(model).encode())
        built.append(model)
    return built


def selected(families: Sequence[str]) -> list[SeedModel]:
    """The SeedModel of each named family, in the order given."""
    return [MODELS[f] for f in families]
