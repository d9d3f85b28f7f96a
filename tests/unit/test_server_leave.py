"""``wait_quiet``: how a leaving service decides the gateway stopped sending to it."""

from __future__ import annotations

import asyncio

from services.core.server import wait_quiet


def test_returns_once_the_count_stands_still() -> None:
    async def scenario() -> tuple[float, float]:
        count = 0

        async def traffic() -> None:
            nonlocal count
            for _ in range(6):  # arrivals for ~0.3 s, then none
                count += 1
                await asyncio.sleep(0.05)

        task = asyncio.ensure_future(traffic())
        waited = await wait_quiet(lambda: count, quiet_s=0.2, within_s=5, tick_s=0.01)
        await task
        return waited

    quiet, waited = asyncio.run(scenario())
    assert quiet == 0.2
    assert 0.45 <= waited < 2.0, waited  # the traffic's ~0.3 s plus 0.2 s of quiet


def test_gives_up_after_within_s_when_traffic_never_stops() -> None:
    async def scenario() -> float:
        count = 0

        async def traffic() -> None:
            nonlocal count
            while True:
                count += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(traffic())
        _, waited = await wait_quiet(lambda: count, quiet_s=0.2, within_s=0.3, tick_s=0.02)
        task.cancel()
        return waited

    waited = asyncio.run(scenario())
    assert 0.3 <= waited < 1.5, waited


def test_zero_quiet_means_no_wait() -> None:
    _, waited = asyncio.run(wait_quiet(lambda: 1, quiet_s=0, within_s=5))
    assert waited < 0.05
