"""The seed benchmark's bookkeeping: turn order, per-way sums, the service's share, the table.

The timers here are plain functions returning seconds and the client only answers
ModelStatistics: what is checked is how benchmarks/seed.py adds up and reports what the real
timers (benchmarks/seed_client.py, exercised by ``python -m benchmarks.seed``) measure.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.seed import (
    COMPUTE,
    GATEWAY,
    IN_PROCESS,
    SERVICE,
    SHM,
    Pair,
    format_table,
    measure_round,
    parse_args,
)
from benchmarks.seed_models import MODELS

SECONDS = {IN_PROCESS: 1.0, GATEWAY: 1.2, SHM: 1.01}


class StatsClient:
    """Answers get_inference_statistics with totals that grow by 1 s (0.9 s compute) per call."""

    def __init__(self) -> None:
        self.wire_calls = 0

    def get_inference_statistics(self, name: str) -> Any:
        ns = self.wire_calls * 10**9
        stats = SimpleNamespace(
            success=SimpleNamespace(ns=ns), compute_infer=SimpleNamespace(ns=ns * 9 // 10)
        )
        return SimpleNamespace(model_stats=[SimpleNamespace(inference_stats=stats)])


def _timers(client: StatsClient, calls: list[tuple[str, int]]) -> dict[str, Any]:
    def timer(way: str) -> Any:
        def run(start: int, stop: int) -> float:
            calls.append((way, start))
            if way == GATEWAY:
                client.wire_calls += 1  # the service saw one more request
            return SECONDS[way]

        return run

    return {way: timer(way) for way in SECONDS}


def test_the_ways_take_turns_and_each_adds_up_its_own_calls() -> None:
    client = StatsClient()
    calls: list[tuple[str, int]] = []
    pair = Pair(MODELS["onnx"], batch=4, images=12)
    order = (IN_PROCESS, GATEWAY, SHM)
    measure_round(client, pair, _timers(client, calls), order, "batch")  # type: ignore[arg-type]

    assert calls == [
        (IN_PROCESS, 0), (GATEWAY, 0), (SHM, 0),
        (GATEWAY, 4), (SHM, 4), (IN_PROCESS, 4),
        (SHM, 8), (IN_PROCESS, 8), (GATEWAY, 8),
    ]  # fmt: skip
    assert pair.seconds[IN_PROCESS] == [pytest.approx(3.0)]
    assert pair.seconds[GATEWAY] == [pytest.approx(3.6)]
    assert pair.seconds[SHM] == [pytest.approx(3.03)]
    # the service's account covers the wire calls only
    assert pair.seconds[SERVICE] == [pytest.approx(3.0)]
    assert pair.seconds[COMPUTE] == [pytest.approx(2.7)]
    assert pair.call_ratios[GATEWAY] == [pytest.approx(1.2)] * 3
    assert pair.call_ratios[SHM] == [pytest.approx(1.01)] * 3
    assert pair.ratio == pytest.approx(1.2)
    assert pair.ratio_of(SHM) == pytest.approx(1.01)


def test_run_interleave_times_each_way_as_a_block_in_order() -> None:
    client = StatsClient()
    calls: list[tuple[str, int]] = []
    pair = Pair(MODELS["torch"], batch=5, images=10)
    order = (GATEWAY, IN_PROCESS)
    measure_round(client, pair, _timers(client, calls), order, "run")  # type: ignore[arg-type]
    assert calls == [(GATEWAY, 0), (GATEWAY, 5), (IN_PROCESS, 0), (IN_PROCESS, 5)]
    assert pair.seconds[SHM] == []
    assert pair.call_ratios == {GATEWAY: [], SHM: []}
    assert pair.ratio == pytest.approx(1.2)


def test_the_table_judges_each_served_way_and_marks_what_was_not_measured() -> None:
    measured = Pair(MODELS["onnx"], batch=32, images=64)
    measured.seconds = {
        IN_PROCESS: [2.0],
        GATEWAY: [2.2],
        SHM: [2.02],
        SERVICE: [2.0],
        COMPUTE: [2],
    }
    wire_only = Pair(MODELS["torch"], batch=10, images=20)
    wire_only.seconds = {IN_PROCESS: [2.0], GATEWAY: [2.08], SHM: [], SERVICE: [2.0], COMPUTE: [2]}

    rows = format_table([measured, wire_only], target=1.05).splitlines()

    onnx, torch = rows[1].split(), rows[2].split()
    assert (
        onnx[0] == "onnx" and onnx[5] == "1.100" and onnx[-4:] == ["FAIL", "2.02", "1.010", "PASS"]
    )
    # transport: (2.2 - 2.0) s over 2 requests
    assert "100.0" in onnx
    assert torch[0] == "torch" and torch[5] == "1.040" and torch[-4:] == ["PASS", "-", "-", "-"]


def test_shm_is_on_unless_turned_off() -> None:
    assert parse_args([]).shm is True
    assert parse_args(["--no-shm"]).shm is False
