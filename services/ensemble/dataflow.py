"""The dataflow loop both ensemble runtimes share (runtime.py, and streaming.py per flow)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.core.gateway_client import WireTensor
from services.ensemble.graph import Step


async def run_dataflow(
    running: dict[asyncio.Task[dict[str, WireTensor]], Step],
    tensors: dict[str, WireTensor],
    launch_ready: Callable[[], None],
) -> None:
    """Launch the ready steps, then merge each finished step's outputs into ``tensors`` and launch
    what became ready, until nothing runs; on a failure the steps still running are cancelled."""
    try:
        launch_ready()
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                running.pop(task)
                tensors.update(task.result())
            launch_ready()
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
