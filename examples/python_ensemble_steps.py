"""Python-backend steps of the ensemble examples (examples/build_ensemble.py), as a Triton user
writes them; examples/build_python.py builds them (see its docstring for their interfaces):
``preprocess_image_python`` (Pillow decode + normalise), ``topk_python`` (softmax + top-k) and
``slow_a_python`` / ``slow_b_python`` (sleep, then a linear function).
"""

from __future__ import annotations

PREPROCESS_IMAGE_CONFIG = """name: "preprocess_image_python"
backend: "python"
max_batch_size: 8
input [ { name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "PIXELS" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
dynamic_batching { }
instance_group [ { kind: KIND_CPU } ]
"""

PREPROCESS_IMAGE_MODEL = '''"""Image bytes → the normalised CHW float image a classifier takes.

IMAGE: BYTES [batch, 1], each element a PNG, JPEG, ... file's bytes.
PIXELS: FP32 [batch, 3, H, W] (H, W from PIXELS's dims in the config): decoded, converted to RGB,
resized (bilinear), scaled to [0, 1] and normalised with ImageNet's mean and std.
"""

import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class BadImage(Exception):
    """One element of IMAGE is not an image Pillow can decode."""


class TritonPythonModel:
    def initialize(self, args):
        try:
            from PIL import Image
        except ImportError as exc:
            raise RuntimeError(
                f"{args['model_name']} needs Pillow ({exc}); "
                "install the extra: pip install '.[python]'"
            ) from exc
        self.pil = Image
        config = json.loads(args["model_config"])
        channels, height, width = pb_utils.get_output_config_by_name(config, "PIXELS")["dims"]
        if channels != 3:
            raise ValueError(f"PIXELS must have dims [ 3, H, W ] (RGB), not {channels} channels")
        self.size = (width, height)

    def decode(self, index, data):
        pil = self.pil
        try:
            with pil.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB").resize(self.size, pil.Resampling.BILINEAR)
        except pil.UnidentifiedImageError:
            raise BadImage(
                f"IMAGE[{index}] ({len(data)} bytes) is not in an image format Pillow can read"
            ) from None
        except (OSError, SyntaxError, ValueError, TypeError, pil.DecompressionBombError) as exc:
            raise BadImage(f"IMAGE[{index}] cannot be decoded as an image: {exc}") from exc
        pixels = np.asarray(rgb, dtype=np.float32) / 255.0
        return ((pixels - MEAN) / STD).transpose(2, 0, 1)

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            try:
                pixels = np.stack([self.decode(i, data) for i, data in enumerate(images.flat)])
            except BadImage as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PIXELS", pixels)]))
        return responses
'''

TOPK_CONFIG = """name: "topk_python"
backend: "python"
max_batch_size: 8
input [ { name: "SCORES" data_type: TYPE_FP32 dims: [ 10 ] } ]
output [
  { name: "LABELS" data_type: TYPE_STRING dims: [ 3 ] },
  { name: "PROBS" data_type: TYPE_FP32 dims: [ 3 ] }
]
parameters { key: "top_k" value: { string_value: "3" } }
dynamic_batching { }
instance_group [ { kind: KIND_CPU } ]
"""

TOPK_MODEL = '''"""Class scores → the k most likely labels and their probabilities, best first.

SCORES: FP32 [batch, classes]; LABELS: BYTES [batch, k]; PROBS: FP32 [batch, k]. The labels are
the lines of labels.txt in this model's directory; k is the config parameter top_k (default 3).
Equal probabilities keep the lower class index first.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.k = int(config.get("parameters", {}).get("top_k", {}).get("string_value", "3"))
        labels_file = Path(args["model_repository"]) / "labels.txt"
        lines = labels_file.read_text(encoding="utf-8").splitlines()
        self.labels = np.array([line.encode() for line in lines if line.strip()], dtype=object)
        if not 1 <= self.k <= len(self.labels):
            raise ValueError(f"top_k is {self.k}; it must be in [1, {len(self.labels)}]")
        for name in ("LABELS", "PROBS"):
            dims = pb_utils.get_output_config_by_name(config, name)["dims"]
            if dims not in ([self.k], [-1]):
                raise ValueError(
                    f"output {name} has dims {dims} but top_k is {self.k}; set dims: [ {self.k} ]"
                )

    def execute(self, requests):
        responses = []
        for request in requests:
            scores = pb_utils.get_input_tensor_by_name(request, "SCORES").as_numpy()
            if scores.shape[-1] != len(self.labels):
                error = pb_utils.TritonError(
                    f"SCORES has {scores.shape[-1]} classes; labels.txt has {len(self.labels)}",
                    pb_utils.TritonError.INVALID_ARG,
                )
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            shifted = scores.astype(np.float64) - scores.max(axis=-1, keepdims=True)
            probs = np.exp(shifted)
            probs /= probs.sum(axis=-1, keepdims=True)
            top = np.argsort(-probs, axis=-1, kind="stable")[..., : self.k]
            labels = pb_utils.Tensor("LABELS", self.labels[top])
            top_probs = np.take_along_axis(probs, top, axis=-1).astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse([labels, pb_utils.Tensor("PROBS", top_probs)])
            )
        return responses
'''

#: topk_python's labels.txt: the labels of ``cnn`` (CNN_LABELS in examples/build_repository.py;
#: a unit test keeps them equal)
TOPK_LABELS_TXT = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n"


def slow_config(name: str, scale: int, offset: int, delay_ms: int = 400) -> str:
    parameters = {"delay_ms": delay_ms, "scale": scale, "offset": offset}
    entries = ",\n".join(
        f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        for key, value in parameters.items()
    )
    return f"""name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }} ]
parameters [
{entries}
]
dynamic_batching {{ }}
instance_group [ {{ kind: KIND_CPU }} ]
"""


SLOW_MODEL = '''"""OUTPUT0 = INPUT0 * scale + offset, after sleeping delay_ms (once per batch).

The config parameters delay_ms, scale and offset (defaults 400, 1, 0) set the behaviour.
"""

import json
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        params = {key: value["string_value"] for key, value in parameters.items()}
        self.delay_s = float(params.get("delay_ms", "400")) / 1000.0
        self.scale = int(params.get("scale", "1"))
        self.offset = int(params.get("offset", "0"))
        output_config = pb_utils.get_output_config_by_name(config, "OUTPUT0")
        self.dtype = pb_utils.triton_string_to_numpy(output_config["data_type"])

    def execute(self, requests):
        time.sleep(self.delay_s)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            y = (x * self.scale + self.offset).astype(self.dtype)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return responses
'''
