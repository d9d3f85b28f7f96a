"""Triton's CPU metrics for the host a service runs on: ``nv_cpu_utilization``,
``nv_cpu_memory_total_bytes`` and ``nv_cpu_memory_used_bytes`` (no labels), read from Linux's
``/proc/stat`` and ``/proc/meminfo`` at each scrape.

Where it sits: server.py registers one HostMetricsCollector in the metrics endpoint's registry
unless ``--allow-cpu-metrics=false``; a dashboard built for Triton's CPU panels reads them
unchanged. Utilization is the share of all CPUs' time that was busy (anything but idle and
iowait) since the previous scrape (since the collector started for the first one), 0.0-1.0;
used memory is MemTotal - MemAvailable. Where /proc cannot be read the families are left out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

#: /proc/stat's aggregate "cpu" columns that are time not spent working
_IDLE_COLUMNS = (3, 4)  # idle, iowait
#: the columns that add up to all time (user .. steal; guest time is already in user)
_TIME_COLUMNS = 8


def read_cpu_times(text: str) -> tuple[int, int]:
    """(busy, total) jiffies from /proc/stat's first line ("cpu  user nice system idle ...")."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1 : 1 + _TIME_COLUMNS]]
            total = sum(values)
            idle = sum(values[i] for i in _IDLE_COLUMNS if i < len(values))
            return total - idle, total
    raise ValueError("no aggregate 'cpu' line")


def read_memory(text: str) -> tuple[int, int]:
    """(total, used) bytes from /proc/meminfo: MemTotal and MemTotal - MemAvailable."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            kib[key] = int(rest.split()[0])
    total = kib["MemTotal"] * 1024
    return total, total - kib.get("MemAvailable", kib["MemTotal"]) * 1024


class HostMetricsCollector:
    """The three families at every scrape (thread safe; see the module docstring)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._stat = proc / "stat"
        self._meminfo = proc / "meminfo"
        self._lock = threading.Lock()
        self._warned = False
        self._last: tuple[int, int] | None = None
        self._utilization = 0.0
        self._sample_cpu()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        utilization = self._sample_cpu()
        if utilization is not None:
            yield GaugeMetricFamily(
                "nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", value=utilization
            )
        try:
            total, used = read_memory(self._meminfo.read_text())
        except (OSError, ValueError, KeyError, IndexError) as exc:
            self._warn(exc)
            return
        yield GaugeMetricFamily(
            "nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", value=total
        )
        yield GaugeMetricFamily(
            "nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", value=used
        )

    def _sample_cpu(self) -> float | None:
        """Busy share since the previous sample; None when /proc/stat cannot be read."""
        try:
            busy, total = read_cpu_times(self._stat.read_text())
        except (OSError, ValueError) as exc:
            self._warn(exc)
            return None
        with self._lock:
            if self._last is not None and total > self._last[1]:
                self._utilization = (busy - self._last[0]) / (total - self._last[1])
                self._utilization = min(max(self._utilization, 0.0), 1.0)
            if self._last is None or total > self._last[1]:
                self._last = (busy, total)
            return self._utilization

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("CPU metrics left out: cannot read %s (%s)", self._stat.parent, exc)
