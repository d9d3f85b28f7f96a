"""Turning measurements into the side-by-side table, the issue's goal checks and a JSON file.

Ratios compare each row with the in-process reference of its model: the best batched throughput
for a model that is served batched (cnn), the batch-1 throughput for one whose point is per-request
overhead (mlp). Goals are the issue's performance targets, checked for every served scenario.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.results import IN_PROCESS, Measurement

BATCH_ONE = "batch-1"
BEST_BATCHED = "best batched"
REFERENCE_KIND: dict[str, str] = {"mlp": BATCH_ONE, "cnn": BEST_BATCHED}
"""Which in-process figure each model's served throughput is compared with (default: best)."""


def reference(rows: Sequence[Measurement], model: str) -> Measurement | None:
    """The in-process row that `model`'s ratios are taken against."""
    local = [r for r in rows if not r.served and r.model == model]
    if REFERENCE_KIND.get(model, BEST_BATCHED) == BATCH_ONE:
        return next((r for r in local if r.load == 1), None)
    batched = [r for r in local if r.load > 1] or local
    return max(batched, key=lambda r: r.infer_per_s, default=None)


def find(rows: Sequence[Measurement], scenario: str, model: str, load: int) -> Measurement | None:
    """The row for one scenario, model and load, if measured."""
    return next((r for r in rows if (r.scenario, r.model, r.load) == (scenario, model, load)), None)


@dataclass(frozen=True)
class GoalResult:
    """The outcome of one goal for one served scenario."""

    goal: str
    scenario: str
    status: str
    """PASS, FAIL or SKIP (a row it needs was not measured)."""
    detail: str


@dataclass(frozen=True)
class Goal:
    """One performance target from the issue."""

    text: str
    check: Callable[[Sequence[Measurement], str], tuple[bool, str] | None]
    """Given all rows and a served scenario: (passed, detail), or None when data is missing."""

    def evaluate(self, rows: Sequence[Measurement], scenario: str) -> GoalResult:
        """Run the check for `scenario`."""
        outcome = self.check(rows, scenario)
        if outcome is None:
            return GoalResult(self.text, scenario, "SKIP", "not measured")
        passed, detail = outcome
        return GoalResult(self.text, scenario, "PASS" if passed else "FAIL", detail)


def _throughput_goal(
    model: str, concurrency: int, fraction: float
) -> Callable[[Sequence[Measurement], str], tuple[bool, str] | None]:
    def check(rows: Sequence[Measurement], scenario: str) -> tuple[bool, str] | None:
        served, ref = find(rows, scenario, model, concurrency), reference(rows, model)
        if served is None or ref is None:
            return None
        need = fraction * ref.infer_per_s
        ok = served.infer_per_s >= need
        return ok, f"{served.infer_per_s:,.0f} infer/s vs needed {need:,.0f}"

    return check


def _latency_goal(
    model: str, slack_ms: float
) -> Callable[[Sequence[Measurement], str], tuple[bool, str] | None]:
    def check(rows: Sequence[Measurement], scenario: str) -> tuple[bool, str] | None:
        served, local = find(rows, scenario, model, 1), find(rows, IN_PROCESS, model, 1)
        if served is None or local is None:
            return None
        limit = local.p50_ms + slack_ms
        return served.p50_ms <= limit, f"p50 {served.p50_ms:.3f} ms vs limit {limit:.3f} ms"

    return check


GOALS: tuple[Goal, ...] = (
    Goal("cnn c64 >= 0.90 x best in-process batched", _throughput_goal("cnn", 64, 0.90)),
    Goal("mlp c64 >= 0.45 x in-process batch-1", _throughput_goal("mlp", 64, 0.45)),
    Goal("mlp c1 p50 <= in-process batch-1 p50 + 0.3 ms", _latency_goal("mlp", 0.3)),
)


def check_goals(rows: Sequence[Measurement]) -> list[GoalResult]:
    """Every goal for every served scenario present in `rows`."""
    scenarios = list(dict.fromkeys(r.scenario for r in rows if r.served))
    return [goal.evaluate(rows, s) for s in scenarios for goal in GOALS]


def _ratio(rows: Sequence[Measurement], row: Measurement) -> str:
    ref = reference(rows, row.model)
    if ref is None or ref.infer_per_s <= 0 or math.isnan(row.infer_per_s):
        return "-"
    return f"{row.infer_per_s / ref.infer_per_s:.2f}"


def format_table(rows: Sequence[Measurement]) -> str:
    """The side-by-side table; `load` is batch size in-process and concurrency when served."""
    header = ("scenario", "model", "conc/batch", "infer/s", "p50 ms", "p99 ms", "ratio", "note")
    lines = [header]
    for r in rows:
        load = f"b{r.load}" if not r.served else f"c{r.load}"
        lines.append(
            (
                r.scenario,
                r.model,
                load,
                f"{r.infer_per_s:,.0f}",
                f"{r.p50_ms:.3f}",
                f"{r.p99_ms:.3f}",
                _ratio(rows, r),
                r.note,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {3, 4, 5, 6}
    out = []
    for line in lines:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
    refs = ", ".join(f"{m}: in-process {k}" for m, k in REFERENCE_KIND.items())
    out.append(f"ratio = infer/s over the model's reference ({refs}; others: {BEST_BATCHED})")
    return "\n".join(out)


def format_gateway_table(rows: Sequence[Measurement], direct: str, gateway: str) -> str:
    """Per model and concurrency: what the gateway adds over direct ("" if no pair measured).

    added p50/p99 = gateway minus direct latency (ms); ratio = gateway infer/s over direct infer/s.
    """
    header: tuple[str, ...] = ("model", "conc", "direct p50", "gw p50", "+p50 ms")
    header += ("direct p99", "gw p99", "+p99 ms", "direct inf/s", "gw inf/s", "gw/direct")
    lines = [header]
    for g in rows:
        d = find(rows, direct, g.model, g.load) if g.scenario == gateway else None
        if d is None:
            continue
        ratio = g.infer_per_s / d.infer_per_s if d.infer_per_s > 0 else math.nan
        lines.append(
            (
                g.model,
                f"c{g.load}",
                f"{d.p50_ms:.3f}",
                f"{g.p50_ms:.3f}",
                f"{g.p50_ms - d.p50_ms:+.3f}",
                f"{d.p99_ms:.3f}",
                f"{g.p99_ms:.3f}",
                f"{g.p99_ms - d.p99_ms:+.3f}",
                f"{d.infer_per_s:,.0f}",
                f"{g.infer_per_s:,.0f}",
                f"{ratio:.2f}",
            )
        )
    if len(lines) == 1:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(line))
        for line in lines
    ]
    out.insert(0, f"gateway overhead ({gateway} vs {direct}, same perf_analyzer settings)")
    return "\n".join(line.rstrip() for line in out)


def format_goals(results: Sequence[GoalResult]) -> str:
    """One PASS/FAIL/SKIP line per goal and scenario."""
    return "\n".join(f"{g.status:4}  [{g.scenario}] {g.goal}: {g.detail}" for g in results)


def save_json(
    directory: Path,
    rows: Sequence[Measurement],
    goals: Sequence[GoalResult],
    settings: dict[str, Any],
    errors: Sequence[str],
) -> Path:
    """Write everything to `directory/bench-<timestamp>.json` and return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = directory / f"bench-{stamp}.json"
    document = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": settings,
        "rows": [r.to_json() for r in rows],
        "goals": [g.__dict__ for g in goals],
        "errors": list(errors),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
