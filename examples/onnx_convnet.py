"""Layers of the ONNX example graphs built by hand (examples/build_repository.py): He-initialised
weights, initializers, and ``ConvNet``, which accumulates the nodes of a small ResNet."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

FloatArray = npt.NDArray[np.float32]


def he_weights(rng: np.random.Generator, shape: Sequence[int], fan_in: int) -> FloatArray:
    """He-initialised weights: activations keep their scale through ReLU layers."""
    weights: FloatArray = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return weights


def initializer(name: str, array: npt.NDArray[np.generic]) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


class ConvNet:
    """Accumulates the nodes and initialisers of a ResNet-style graph."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv_bn(self, x: str, name: str, c_in: int, c_out: int, k: int, stride: int) -> str:
        """Conv (no bias) followed by BatchNormalization, as exported from training code."""
        w = he_weights(self.rng, (c_out, c_in, k, k), c_in * k * k)
        gamma = (1.0 + 0.1 * self.rng.standard_normal(c_out)).astype(np.float32)
        beta = (0.1 * self.rng.standard_normal(c_out)).astype(np.float32)
        mean = (0.1 * self.rng.standard_normal(c_out)).astype(np.float32)
        var = (1.0 + 0.1 * self.rng.random(c_out)).astype(np.float32)
        for suffix, value in (("w", w), ("g", gamma), ("b", beta), ("m", mean), ("v", var)):
            self.inits.append(initializer(f"{name}.{suffix}", value))
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.w"],
                [f"{name}.conv"],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
                name=f"{name}.conv",
            )
        )
        bn_inputs = [f"{name}.conv", *(f"{name}.{s}" for s in "gbmv")]
        self.nodes.append(
            helper.make_node("BatchNormalization", bn_inputs, [f"{name}.bn"], name=f"{name}.bn")
        )
        return f"{name}.bn"

    def relu(self, x: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"], name=f"{x}.relu"))
        return f"{x}.relu"

    def basic_block(self, x: str, name: str, c_in: int, c_out: int, stride: int) -> str:
        """Two 3x3 conv-bn layers plus the (projected when the shape changes) shortcut."""
        y = self.relu(self.conv_bn(x, f"{name}.a", c_in, c_out, 3, stride))
        y = self.conv_bn(y, f"{name}.b", c_out, c_out, 3, 1)
        shortcut = x
        if stride != 1 or c_in != c_out:
            shortcut = self.conv_bn(x, f"{name}.proj", c_in, c_out, 1, stride)
        self.nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}.add"], name=name))
        return self.relu(f"{name}.add")
