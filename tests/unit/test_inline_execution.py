"""Where a batch executes: on the event loop thread when that is cheaper, else on a worker.

A worker-thread round trip costs two thread wake-ups. Short batches (moving average below
INLINE_EXECUTION_NS) always run on the loop; batches up to INLINE_WHEN_ALONE_NS run there only
when they hold every request the model has in flight (nothing else waits for the loop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core import model as model_module
from services.core.model import ServedModel
from services.core.requests import Array, InferRequest
from services.core.runtime import InstanceSpec, Runtime

CONFIG = """
name: "sleeper"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 0 }
"""


class SleeperRuntime(Runtime):
    """Echoes its input after sleeping IN[0] milliseconds; records the thread it ran on."""

    backend = "test"
    default_model_filename = "model.bin"
    threads: list[int] = []

    def __init__(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> None:
        pass

    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        SleeperRuntime.threads.append(threading.get_ident())
        time.sleep(float(inputs["IN"].max()) / 1000)
        return {"OUT": np.asarray(inputs["IN"])}


def request(delay_ms: float) -> InferRequest:
    return InferRequest(
        model_name="sleeper",
        model_version="",
        inputs={"IN": np.array([[delay_ms]], dtype=np.float32)},
        outputs=[],
    )


async def load(tmp_path: Path) -> ServedModel:
    config = text_format.Parse(CONFIG, mc.ModelConfig())
    SleeperRuntime.threads = []
    return await ServedModel.load(config, 1, tmp_path, SleeperRuntime)


async def settle(model: ServedModel, delay_ms: float) -> None:
    """Run requests alone until the moving average reflects ``delay_ms``."""
    for _ in range(30):
        await model.infer(request(delay_ms))
    SleeperRuntime.threads.clear()


async def test_a_request_alone_runs_on_the_loop_thread(tmp_path: Path) -> None:
    model = await load(tmp_path)
    try:
        await settle(model, 0.4)  # between INLINE_EXECUTION_NS and INLINE_WHEN_ALONE_NS
        await model.infer(request(0.4))
        assert SleeperRuntime.threads == [threading.get_ident()]
    finally:
        await model.close()


async def test_a_batch_with_others_waiting_runs_on_a_worker(tmp_path: Path) -> None:
    model = await load(tmp_path)
    try:
        await settle(model, 0.4)
        # The first request's batch is dispatched at once (no queue delay); the second arrives
        # while it runs, so the first batch had company and must not block the loop.
        first = asyncio.ensure_future(model.infer(request(0.4)))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(model.infer(request(0.4)))
        await asyncio.gather(first, second)
        assert SleeperRuntime.threads[0] != threading.get_ident()
    finally:
        await model.close()


async def test_long_batches_never_run_on_the_loop(tmp_path: Path) -> None:
    model = await load(tmp_path)
    try:
        slow_ms = model_module.INLINE_WHEN_ALONE_NS / 1e6 * 3
        await settle(model, slow_ms)
        await model.infer(request(slow_ms))
        assert SleeperRuntime.threads == [SleeperRuntime.threads[0]]
        assert SleeperRuntime.threads[0] != threading.get_ident()
    finally:
        await model.close()
