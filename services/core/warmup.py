"""model_warmup: run the config's warmup samples on every instance before a version turns READY.

Samples follow Triton's ModelWarmup: per input a data_type, dims (without the batch dimension)
and zero_data / random_data / input_data_file (a file in the model's ``warmup/`` folder). A
failing sample fails the load, with the sample's name in the error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes
from services.core.errors import ModelLoadError
from services.core.requests import Array
from services.core.runtime import Runtime

log = logging.getLogger(__name__)


def _sample_input(
    config: mc.ModelConfig,
    sample: mc.ModelWarmup,
    name: str,
    spec: mc.ModelWarmup.Input,
    model_dir: Path,
) -> Array:
    dtype = dtypes.numpy_from_config(spec.data_type)
    shape = [int(d) for d in spec.dims]
    if config.max_batch_size > 0:
        shape = [max(sample.batch_size, 1), *shape]
    count = int(np.prod(shape)) if shape else 1
    kind = spec.WhichOneof("input_data_type")
    if kind == "input_data_file":
        path = model_dir / "warmup" / spec.input_data_file
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(
                f"warmup sample '{sample.name}': cannot read {path}: {exc}"
            ) from exc
        if dtype == np.object_:
            one = dtypes.deserialize_bytes(
                raw, count // max(shape[0], 1) if shape else 1, str(path)
            )
            return np.resize(one, shape)
        per_item = int(np.prod(spec.dims)) if len(spec.dims) else 1
        one = np.frombuffer(raw, dtype=dtype, count=per_item)
        return np.broadcast_to(
            one, (*shape[:1], *spec.dims) if config.max_batch_size > 0 else shape
        ).copy()
    if dtype == np.object_:
        return np.full(shape, b"0" if kind != "random_data" else b"1", dtype=object)
    if kind == "random_data":
        rng = np.random.default_rng(0)
        if np.issubdtype(dtype, np.floating):
            return rng.random(shape).astype(dtype)
        if dtype == np.bool_:
            return rng.integers(0, 2, shape).astype(dtype)
        return rng.integers(0, 8, shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


def run_warmup(config: mc.ModelConfig, version_path: Path, instances: Sequence[Runtime]) -> None:
    """Run every warmup sample ``count`` times (at least once) on each instance."""
    outputs = [o.name for o in config.output]
    model_dir = version_path.parent
    for sample in config.model_warmup:
        inputs = {
            n: _sample_input(config, sample, n, s, model_dir) for n, s in sample.inputs.items()
        }
        for runtime in instances:
            for _ in range(max(sample.count, 1)):
                try:
                    runtime.infer(inputs, outputs)
                except Exception as exc:
                    raise ModelLoadError(
                        f"model '{config.name}': warmup sample '{sample.name}' failed: {exc}"
                    ) from exc
        log.info(
            "model %r: warmup sample %r done on %d instance(s)",
            config.name,
            sample.name,
            len(instances),
        )
