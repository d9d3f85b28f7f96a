"""The seed benchmark's in-process side: each framework alone in a process of its own.

``InProcessWorker`` spawns a child process that imports one framework, loads the model file its
service loads (benchmarks/seed_models.py's repository), makes the same images as the gateway
side (``images_for``, same seed) and runs one batch whenever asked, timing it itself. A process
per framework, like the services, keeps the baseline apart from the benchmark client, the mesh's
event-loop thread and the other frameworks, and gives it the process settings its service has.

Settings match the services: torch and TensorFlow with their default pools (the services set
none for these configs), TorchScript under ``inference_mode`` with optimized execution as
services/torch runs it; onnxruntime with the session options services/onnx builds from the
config (``plan_session``: intra-op spinning off, the ONNX service's default); for torch (and the
Python family, whose baseline is torch) the malloc settings services/torch and services/python
apply at start (services/core/allocator.py). Without them torch page-faults its activations in
on every call (ResNet-50 batch 32: ~1.1 million minor faults, 2.5-3.7 s instead of 1.4 s here),
worse on the main thread than on a worker thread, so a plain script is no fair baseline.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.seed_models import MODELS, SeedModel
from services.core.allocator import tune_for_tensors

#: families whose service tunes malloc at start (services/core/allocator.py); so does the worker
TUNED_FAMILIES = ("torch", "python")

Images = npt.NDArray[np.float32]
#: one batch in, its scores out
Call = Callable[[Images], npt.NDArray[np.float32]]


def images_for(model: SeedModel, count: int, seed: int = 0) -> Images:
    """``count`` random FP32 images in the model's layout (NCHW, or NHWC for TensorFlow)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((count, 3, 224, 224), dtype=np.float32)
    if model.channels_last:
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    return images


def _version_dir(repository: Path, model: SeedModel) -> Path:
    return repository / model.name / "1"


def torch_call(path: Path) -> Call:
    """TorchScript as services/torch runs it: inference_mode, optimized execution, default pools."""
    import torch
    from torch.jit._fuser import optimized_execution

    load: Callable[..., Any] = torch.jit.load  # untyped in torch's stubs
    module = load(str(path), map_location="cpu")
    module.eval()

    def call(images: Images) -> npt.NDArray[np.float32]:
        with torch.inference_mode(), optimized_execution(True):
            scores: npt.NDArray[np.float32] = module(torch.from_numpy(images)).numpy()
        return scores

    return call


def onnx_call(repository: Path, model: SeedModel) -> Call:
    """onnxruntime with exactly the session options the ONNX service builds from the config."""
    import onnxruntime as ort

    from protos.gen.inference import model_config_pb2 as mc
    from services.core.config import load_config_file
    from services.core.runtime import InstanceSpec
    from services.onnx.session_options import plan_session

    config = load_config_file(repository / model.name / "config.pbtxt")
    plan = plan_session(config, InstanceSpec(f"{model.name}_0", mc.ModelInstanceGroup.KIND_CPU))
    session = ort.InferenceSession(
        str(_version_dir(repository, model) / "model.onnx"),
        plan.options,
        providers=plan.providers,
        provider_options=plan.provider_options,
    )

    def call(images: Images) -> npt.NDArray[np.float32]:
        scores: npt.NDArray[np.float32] = session.run(
            [model.output_name], {model.input_name: images}
        )[0]
        return scores

    return call


def tensorflow_call(path: Path, model: SeedModel) -> Call:
    """The SavedModel's serving_default signature, as services/tensorflow calls it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # type: ignore[import-untyped]  # no py.typed

    function = tf.saved_model.load(str(path), tags=["serve"]).signatures["serving_default"]

    def call(images: Images) -> npt.NDArray[np.float32]:
        result = function(**{model.input_name: tf.convert_to_tensor(images)})
        scores: npt.NDArray[np.float32] = result[model.output_name].numpy()
        return scores

    return call


def in_process_call(repository: Path, model: SeedModel) -> Call:
    """The native baseline of one family (the Python family's is its TorchScript model)."""
    version = _version_dir(repository, model)
    if model.family in ("torch", "python"):
        return torch_call(version / "model.pt")
    if model.family == "onnx":
        return onnx_call(repository, model)
    return tensorflow_call(version / "model.savedmodel", model)


def _serve_batches(conn: Connection, repository: str, family: str, count: int) -> None:
    """The child: load, say "ready", then time one batch per (start, stop) until None."""
    import time

    try:
        model = MODELS[family]
        if family in TUNED_FAMILIES:
            tune_for_tensors()  # as services/torch and services/python do at start
        call = in_process_call(Path(repository), model)
        images = images_for(model, count)
        conn.send("ready")
        while (request := conn.recv()) is not None:
            start, stop = request
            began = time.perf_counter()
            call(images[start:stop])
            conn.send(time.perf_counter() - began)
    except EOFError:
        pass  # the benchmark went away
    except Exception:
        conn.send(RuntimeError(f"in-process {family} failed:\n{traceback.format_exc()}"))
    finally:
        conn.close()


class InProcessWorker:
    """One framework in a spawned child process; ``run(start, stop)`` times one batch there."""

    def __init__(self, repository: Path, model: SeedModel, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_batches,
            args=(child, str(repository), model.family, count),
            name=f"seed-in-process-{model.family}",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._answer()  # "ready", or the child's load error

    def _answer(self) -> Any:
        answer = self._conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def run(self, start: int, stop: int) -> float:
        """Seconds the child took for images[start:stop] (measured in the child)."""
        self._conn.send((start, stop))
        seconds: float = self._answer()
        return seconds

    def close(self) -> None:
        """Ask the child to exit; terminate it if it does not within 30 s."""
        with contextlib.suppress(OSError):  # already gone
            self._conn.send(None)
        self._process.join(30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()
