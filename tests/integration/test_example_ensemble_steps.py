"""The ensemble examples' step models served for real (ONNX + Python services' runtimes on one
server) and called with tritonclient: BYTES images in, labels out, errors with their status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from examples.build_ensemble import required_models
from examples.build_python import build_python_repository
from examples.build_repository import CNN_LABELS, build_repository
from services.onnx.runtime import OnnxRuntime
from services.python.runtime import PythonRuntime
from tests.support import ServerThread, settings_for
from tests.unit.test_example_ensembles import encode, normalised, random_rgb


@pytest.fixture(scope="module")
def steps_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root: Path = tmp_path_factory.mktemp("ensemble_steps")
    needed = required_models()
    build_python_repository(root, needed.python)
    build_repository(root, needed.onnx)
    with ServerThread(settings_for(root), [OnnxRuntime, PythonRuntime]) as server:
        yield server


def _bytes_input(name: str, blobs: list[bytes]) -> grpcclient.InferInput:
    data = np.array([[blob] for blob in blobs], dtype=object)
    inp = grpcclient.InferInput(name, list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    return inp


def _fp32_input(name: str, data: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return inp


def test_image_steps_chained_by_the_client(steps_server: ServerThread) -> None:
    rgb = [random_rgb(20), random_rgb(21)]
    with grpcclient.InferenceServerClient(steps_server.grpc_url) as client:
        for name in required_models().python:
            assert client.is_model_ready(name), name
        pixels = client.infer(
            "preprocess_image_python", [_bytes_input("IMAGE", [encode(x) for x in rgb])]
        ).as_numpy("PIXELS")
        assert pixels.shape == (2, 3, 64, 64) and pixels.dtype == np.float32
        np.testing.assert_allclose(pixels, np.stack([normalised(x) for x in rgb]), atol=1e-6)
        scores = client.infer("cnn", [_fp32_input("INPUT0", pixels)]).as_numpy("OUTPUT0")
        result = client.infer("topk_python", [_fp32_input("SCORES", scores)])
    labels = result.as_numpy("LABELS")
    probs = result.as_numpy("PROBS")
    assert labels.shape == probs.shape == (2, 3)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    assert labels.tolist() == [[CNN_LABELS[i].encode() for i in row] for row in expected]
    assert np.all(np.diff(probs, axis=1) <= 0) and np.all(probs.sum(axis=1) <= 1 + 1e-6)


def test_non_image_bytes_are_invalid_argument(steps_server: ServerThread) -> None:
    image = _bytes_input("IMAGE", [b"not an image"])
    with (
        grpcclient.InferenceServerClient(steps_server.grpc_url) as client,
        pytest.raises(InferenceServerException) as info,
    ):
        client.infer("preprocess_image_python", [image])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "IMAGE[0] (12 bytes) is not in an image format Pillow can read" in info.value.message()
