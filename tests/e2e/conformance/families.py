"""The framework families under conformance test, and what the tests need to know of each.

A new family joins by adding a ``Family`` entry to FAMILIES (its example builder, its add/sub
model and tensor names, its identity model and the datatypes it carries). A family whose
framework is not installed is left out of the mesh (AVAILABLE) and its tests skip (``need``).

Two variables, for running the suite on a GPU machine (tests/device/README.md):
``MESHSERVE_TEST_FAMILIES`` (e.g. ``torch``) keeps only those families in the mesh (the others
skip), and ``MESHSERVE_TEST_GPU_FAMILIES`` (e.g. ``torch``) gives those families' models one
KIND_GPU instance on GPU 0 instead of their CPU instances.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import pytest

from tests.datatype_samples import ALL_DATATYPES


def cached_model(model: str) -> str:
    """The name of the copy of ``model`` with response_cache enabled in the conformance mesh."""
    return f"{model}_cached"


@dataclass(frozen=True)
class Family:
    name: str
    #: the module that builds its examples, and the function in it
    builder: tuple[str, str]
    model: str
    datatype: str
    inputs: tuple[str, str]
    outputs: tuple[str, str]
    #: per-request shape without the batch dimension
    dims: tuple[int, ...]
    batched: bool
    #: framework module that must be importable for the family to run
    needs: str
    #: its identity model (IN_<DTYPE> → OUT_<DTYPE>, dims [-1], batched) and the datatypes it
    #: carries: every datatype the family can exchange
    identity: str
    datatypes: tuple[str, ...]
    #: BYTES are UTF-8 text in this framework: other bytes are refused with INVALID_ARGUMENT
    utf8_bytes_only: bool = False
    #: its stateful accumulator (sequence_batching; INT32 [1] → [1], the running sum of the
    #: sequence), "" where the family has none, and that model's input and output names
    sequence: str = ""
    sequence_io: tuple[str, str] = ("INPUT", "OUTPUT")
    #: its ragged-batching model (FP32 values [-1], allow_ragged_batch → the sum per request and
    #: the values doubled), "" where the family has none, and its (values, sum, scaled) names
    ragged: str = ""
    ragged_io: tuple[str, str, str] = ("INPUT", "SUM", "SCALED")

    def arrays(self, value: int) -> tuple[np.ndarray, np.ndarray]:
        dtype = {"INT32": np.int32, "FP32": np.float32}[self.datatype]
        shape = (1, *self.dims) if self.batched else self.dims
        a = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
        return a, np.full(shape, value, dtype=dtype)


FAMILIES = [
    Family(
        "onnx",
        ("examples.build_repository", "build_repository"),
        "simple",
        "INT32",
        ("INPUT0", "INPUT1"),
        ("OUTPUT0", "OUTPUT1"),
        (16,),
        True,
        "onnxruntime",
        identity="dtypes_onnx",
        datatypes=tuple(d for d in ALL_DATATYPES if d != "BF16"),
        utf8_bytes_only=True,
        sequence="simple_sequence",
        ragged="simple_ragged",
    ),
    Family(
        "torch",
        ("examples.build_torch", "build_torch_repository"),
        "simple_torch",
        "INT32",
        ("INPUT__0", "INPUT__1"),
        ("OUTPUT__0", "OUTPUT__1"),
        (16,),
        True,
        "torch",
        identity="dtypes_torch",
        datatypes=tuple(d for d in ALL_DATATYPES if d != "BYTES"),
        sequence="simple_sequence_torch",
        sequence_io=("INPUT__0", "OUTPUT__0"),
        ragged="simple_ragged_torch",
        ragged_io=("INPUT__0", "SUM__0", "SCALED__1"),
    ),
    Family(
        "tensorflow",
        ("examples.build_tensorflow", "build_tensorflow_repository"),
        "simple_tf",
        "INT32",
        ("INPUT0", "INPUT1"),
        ("OUTPUT0", "OUTPUT1"),
        (16,),
        True,
        "tensorflow",
        identity="dtypes_tf",
        datatypes=ALL_DATATYPES,
        sequence="simple_sequence_tf",
        ragged="simple_ragged_tf",
    ),
    Family(
        "python",
        ("examples.build_python", "build_python_repository"),
        "add_sub_python",
        "FP32",
        ("INPUT0", "INPUT1"),
        ("OUTPUT0", "OUTPUT1"),
        (4,),
        False,
        "numpy",
        identity="dtypes_python",
        datatypes=ALL_DATATYPES,
        sequence="sequence_python",
    ),
]


def _names(variable: str) -> set[str]:
    return {n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()}


SELECTED = _names("MESHSERVE_TEST_FAMILIES") or {f.name for f in FAMILIES}
#: families whose models run on a KIND_GPU instance (GPU 0)
ON_GPU = _names("MESHSERVE_TEST_GPU_FAMILIES")
AVAILABLE = [
    f for f in FAMILIES if f.name in SELECTED and importlib.util.find_spec(f.needs) is not None
]


def family_param() -> list[object]:
    return [pytest.param(f, id=f.name) for f in FAMILIES]


def need(family: Family) -> None:
    if family.name not in SELECTED:
        pytest.skip(f"{family.name}: not in MESHSERVE_TEST_FAMILIES")
    if family not in AVAILABLE:
        pytest.skip(f"{family.name}: {family.needs} is not installed")
