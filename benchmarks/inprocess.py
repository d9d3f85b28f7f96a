"""The in-process baseline: onnxruntime called directly on the repository's model files.

This is the ceiling the served numbers are compared with: the same `model.onnx` the ONNX service
loads, run in a loop on one `InferenceSession` (intra-op threads as the service would use), at
several batch sizes, for a fixed time after a warmup.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from benchmarks.cpu import Meter, describe
from benchmarks.results import IN_PROCESS, Measurement, percentile

_ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def model_file(repository: Path, model: str) -> Path:
    """The highest-numbered version's `model.onnx` of `model` in a Triton-layout repository."""
    versions = [
        d
        for d in (repository / model).iterdir()
        if d.is_dir() and d.name.isdigit() and (d / "model.onnx").is_file()
    ]
    if not versions:
        raise FileNotFoundError(f"no <version>/model.onnx under {repository / model}")
    return max(versions, key=lambda d: int(d.name)) / "model.onnx"


def make_session(path: Path, intra_op_threads: int) -> ort.InferenceSession:
    """A CPU session configured as a serving runtime would be."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch_feed(
    session: ort.InferenceSession, batch: int, rng: np.random.Generator
) -> dict[str, npt.NDArray[np.generic]] | None:
    """Real-valued inputs for one call at `batch`; None when the model's batch dim is fixed."""
    feed: dict[str, npt.NDArray[np.generic]] = {}
    for node in session.get_inputs():
        dtype = _ORT_TYPES.get(node.type)
        if dtype is None:
            raise ValueError(f"input {node.name}: type {node.type} not supported by the benchmark")
        dims = list(node.shape)
        if isinstance(dims[0], int) and dims[0] != batch:
            return None
        shape = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]]
        if np.issubdtype(dtype, np.floating):
            feed[node.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
        elif dtype is np.bool_:
            feed[node.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feed[node.name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feed


def measure_batch(
    session: ort.InferenceSession,
    model: str,
    batch: int,
    duration_s: float,
    warmup_s: float,
    rng: np.random.Generator,
) -> Measurement | None:
    """Run `session` at `batch` for `duration_s` after `warmup_s`; None if it cannot batch.

    The row's `cpu` has this process's CPU time over the timed loop (onnxruntime's threads and
    the calling thread), so the model's core-seconds per inference is `cpu.server_s` over the
    inferences run.
    """
    feed = batch_feed(session, batch, rng)
    if feed is None:
        return None
    warm_until = time.perf_counter() + warmup_s
    while time.perf_counter() < warm_until:
        session.run(None, feed)
    latencies: list[float] = []
    meter = Meter()
    start = time.perf_counter()
    end = start + duration_s
    now = start
    while now < end:
        before = now
        session.run(None, feed)
        now = time.perf_counter()
        latencies.append(now - before)
    elapsed = now - start
    use = meter.finish(this_process=True)
    latencies.sort()
    return Measurement(
        scenario=IN_PROCESS,
        model=model,
        load=batch,
        infer_per_s=batch * len(latencies) / elapsed,
        p50_ms=percentile(latencies, 50) * 1000.0,
        p99_ms=percentile(latencies, 99) * 1000.0,
        cpu=use,
    )


def run_in_process(
    repository: Path,
    models: Sequence[str],
    batches: Sequence[int],
    duration_s: float,
    intra_op_threads: int,
    warmup_s: float = 1.0,
) -> list[Measurement]:
    """Measure every model at every batch size, one session per model."""
    rng = np.random.default_rng(0)
    rows: list[Measurement] = []
    for model in models:
        session = make_session(model_file(repository, model), intra_op_threads)
        for batch in batches:
            row = measure_batch(session, model, batch, duration_s, warmup_s, rng)
            if row is not None:
                rows.append(row)
                print(
                    f"  {IN_PROCESS} {model} batch {batch}: {row.infer_per_s:,.0f} infer/s; "
                    f"{describe(row.cpu, served=False)}"
                )
    return rows
