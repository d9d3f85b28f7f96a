"""Result records shared by every benchmark scenario, and the statistics that make them.

Each measurement (in-process onnxruntime or a served target driven by perf_analyzer) becomes one
`Measurement`; `benchmarks.report` turns a list of them into the table, the goal checks and the
JSON file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.cpu import CpuUse

IN_PROCESS = "in-process"


@dataclass(frozen=True)
class Measurement:
    """One row of the benchmark table."""

    scenario: str
    """`in-process`, or the name of a served target (e.g. `service`, later `gateway`)."""
    model: str
    """Model name in the repository."""
    load: int
    """Batch size for in-process rows, client concurrency for served rows."""
    infer_per_s: float
    """Throughput in inferences (samples) per second."""
    p50_ms: float
    """Median latency of one call (one batch in-process, one request when served)."""
    p99_ms: float
    """99th percentile latency of one call."""
    note: str = ""
    """Anything that qualifies the row (e.g. perf_analyzer's stability warning)."""
    cpu: CpuUse | None = None
    """Where the CPU went during the measurement (None: not measured)."""

    @property
    def served(self) -> bool:
        """True for rows measured through a server."""
        return self.scenario != IN_PROCESS

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict (`cpu` with its per-core averages)."""
        document = asdict(self)
        document["cpu"] = None if self.cpu is None else self.cpu.to_json()
        return document


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of already sorted values, nearest-rank method."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
