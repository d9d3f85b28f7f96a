"""Turning measurements into the side-by-side table, the issue's goal checks and a JSON file.

Ratios compare each row with the in-process reference of its model: the best batched throughput
for a model that is served batched (cnn), the batch-1 throughput for one whose point is per-request
overhead (mlp). Goals are the issue's performance targets, checked for every served scenario.

Each row also says where the CPU went (`benchmarks.cpu`), and each served row has a *ceiling*: the
throughput it could reach on this machine if the server cost nothing, given the model's CPU cost
per inference (from the in-process reference) and perf_analyzer's (measured in the row).
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

from benchmarks.cpu import ceiling, fmt, per_inference
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
class Ceiling:
    """The best a served row could do if the server itself cost nothing."""

    infer_per_s: float
    """x with x * (model + client core-seconds per inference) = the machine's CPUs."""
    ratio: float
    """`infer_per_s` over the model's in-process reference."""
    model_core_ms: float
    """The model's core-ms per inference, from the in-process reference row."""
    client_core_ms: float
    """perf_analyzer's core-ms per inference, from the served row."""


def ceiling_of(rows: Sequence[Measurement], row: Measurement) -> Ceiling | None:
    """`row`'s ceiling; None for in-process rows and where CPU figures are missing."""
    ref = reference(rows, row.model)
    if not row.served or row.cpu is None or ref is None or ref.cpu is None:
        return None
    model = per_inference(ref.cpu.server_cores, ref.infer_per_s)
    client = per_inference(row.cpu.client_cores, row.infer_per_s)
    if model is None or client is None or not row.cpu.cpus:
        return None
    best = ceiling(row.cpu.cpus, model, client)
    if best is None:
        return None
    return Ceiling(best, best / ref.infer_per_s, model * 1000.0, client * 1000.0)


def ceiling_note(fraction: float, found: Ceiling | None) -> str:
    """The goal line's remark on the ceiling ("" when unknown)."""
    if found is None:
        return ""
    if found.ratio < fraction:
        return (
            f" (ceiling here {found.ratio:.3f}: the goal needs the load generator on other cores)"
        )
    return f" (ceiling here {found.ratio:.3f})"


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
        note = ceiling_note(fraction, ceiling_of(rows, served))
        return ok, f"{served.infer_per_s:,.0f} infer/s vs needed {need:,.0f}{note}"

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


TABLE_HEADER = (
    *("scenario", "model", "conc/batch", "infer/s", "p50 ms", "p99 ms", "ratio"),
    *("pa cores", "srv cores", "other", "idle", "srv ms/inf", "ceil inf/s", "ceil ratio", "note"),
)
_LEFT = {0, 1, 2, len(TABLE_HEADER) - 1}


def core_ms(cores: float | None, infer_per_s: float) -> float | None:
    """Core-milliseconds per inference from average cores and throughput (None if unknown)."""
    seconds = per_inference(cores, infer_per_s)
    return None if seconds is None else seconds * 1000.0


def table_cells(rows: Sequence[Measurement], r: Measurement) -> tuple[str, ...]:
    """One row of the table as text, in TABLE_HEADER's order."""
    use, found = r.cpu, ceiling_of(rows, r)
    client = None if use is None else use.client_cores
    server = None if use is None else use.server_cores
    return (
        r.scenario,
        r.model,
        f"c{r.load}" if r.served else f"b{r.load}",
        f"{r.infer_per_s:,.0f}",
        f"{r.p50_ms:.3f}",
        f"{r.p99_ms:.3f}",
        _ratio(rows, r),
        fmt(client) if r.served else "-",
        fmt(server),
        fmt(None if use is None else use.other_cores),
        fmt(None if use is None else use.idle_cores),
        fmt(core_ms(server, r.infer_per_s), 3),
        ("n/a" if found is None else f"{found.infer_per_s:,.0f}") if r.served else "-",
        fmt(None if found is None else found.ratio) if r.served else "-",
        r.note,
    )


def format_table(rows: Sequence[Measurement]) -> str:
    """The side-by-side table; `load` is batch size in-process and concurrency when served."""
    lines = [TABLE_HEADER, *(table_cells(rows, r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_HEADER))]
    out = []
    for line in lines:
        cells = [
            cell.ljust(widths[i]) if i in _LEFT else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
    refs = ", ".join(f"{m}: in-process {k}" for m, k in REFERENCE_KIND.items())
    out.append(f"ratio = infer/s over the model's reference ({refs}; others: {BEST_BATCHED})")
    out += [
        "cores (averages over the run): pa = perf_analyzer; srv = the server's processes",
        "  (in-process: this process); other = the rest of the machine's busy time; idle",
        "srv ms/inf = srv core-ms per inference (in-process: the model's cost)",
        "ceil inf/s = infer/s if the server cost nothing: cpus / (reference's srv ms/inf + this",
        "  row's pa ms/inf); ceil ratio = that over the reference",
    ]
    return "\n".join(out)


BUSY_MACHINE_CORES = 0.25
"""Average cores of "other" work above which a row counts as disturbed by other work."""


def busy_machine_note(rows: Sequence[Measurement]) -> str:
    """A warning when other work used the machine during some rows ("" on a quiet machine):
    the in-process references then run slower, and the ceilings (which assume every core is
    for the benchmark) come out too high."""
    others = {
        f"{r.scenario} {r.model} {'c' if r.served else 'b'}{r.load}": r.cpu.other_cores
        for r in rows
        if r.cpu is not None and r.cpu.other_cores is not None
    }
    busy = {k: v for k, v in others.items() if v > BUSY_MACHINE_CORES}
    if not busy:
        return ""
    worst = max(busy, key=lambda k: busy[k])
    return (
        f"warning: other work used the machine during {len(busy)} of {len(others)} rows "
        f"(up to {busy[worst]:.2f} cores, {worst}); in-process references and ceilings are "
        "disturbed: rerun on a quiet machine"
    )


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


def derived(rows: Sequence[Measurement], row: Measurement) -> dict[str, float | None]:
    """Figures computed from `row` and its reference: ratio, CPU per inference, ceiling."""
    ref, use, found = reference(rows, row.model), row.cpu, ceiling_of(rows, row)
    ratio = row.infer_per_s / ref.infer_per_s if ref is not None and ref.infer_per_s > 0 else None

    return {
        "ratio": ratio,
        "client_core_ms_per_inference": core_ms(
            None if use is None else use.client_cores, row.infer_per_s
        ),
        "server_core_ms_per_inference": core_ms(
            None if use is None else use.server_cores, row.infer_per_s
        ),
        "ceiling_infer_per_s": None if found is None else found.infer_per_s,
        "ceiling_ratio": None if found is None else found.ratio,
        "ceiling_model_core_ms": None if found is None else found.model_core_ms,
        "ceiling_client_core_ms": None if found is None else found.client_core_ms,
    }


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
        "rows": [r.to_json() | {"derived": derived(rows, r)} for r in rows],
        "goals": [g.__dict__ for g in goals],
        "errors": list(errors),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
