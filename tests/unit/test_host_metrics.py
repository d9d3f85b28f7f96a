"""Triton's nv_cpu_* host metrics (services/core/host_metrics.py) from /proc files written here,
and --allow-cpu-metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from prometheus_client.registry import CollectorRegistry

from services.core.host_metrics import HostMetricsCollector, read_cpu_times, read_memory
from services.core.metrics import render_text
from services.core.server_flags import add_server_flags, given_argv, server_flags_from

MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    4000000 kB\n"


def stat(user: int, idle: int, iowait: int = 0) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu  {user} 0 0 {idle} {iowait} 0 0 0 50 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1 2\n"


def proc(root: Path, cpu: str, memory: str = MEMINFO) -> Path:
    (root / "stat").write_text(cpu)
    (root / "meminfo").write_text(memory)
    return root


def scrape(collector: HostMetricsCollector) -> dict[str, float]:
    return {m.name: m.samples[0].value for m in collector.collect()}


def test_parsers_read_the_aggregate_line_and_available_memory() -> None:
    assert read_cpu_times(stat(300, 600, 100)) == (300, 1000)  # guest is inside user already
    assert read_memory(MEMINFO) == (16_000_000 * 1024, 12_000_000 * 1024)
    with pytest.raises(ValueError, match="no aggregate"):
        read_cpu_times("cpu0 1 2 3\n")


def test_utilization_is_the_busy_share_since_the_previous_scrape(tmp_path: Path) -> None:
    root = proc(tmp_path, stat(100, 900))
    collector = HostMetricsCollector(root)
    (root / "stat").write_text(stat(175, 925))  # +75 busy of +100
    values = scrape(collector)
    assert values["nv_cpu_utilization"] == pytest.approx(0.75)
    assert values["nv_cpu_memory_total_bytes"] == 16_000_000 * 1024
    assert values["nv_cpu_memory_used_bytes"] == 12_000_000 * 1024
    (root / "stat").write_text(stat(185, 1005, iowait=10))  # +10 busy of +100 (iowait is idle)
    assert scrape(collector)["nv_cpu_utilization"] == pytest.approx(0.10)
    # no time passed since: the last value stands
    assert scrape(collector)["nv_cpu_utilization"] == pytest.approx(0.10)


def test_unreadable_proc_leaves_the_families_out(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(HostMetricsCollector(tmp_path / "missing"))
    assert b"nv_cpu" not in render_text(registry)
    partial = proc(tmp_path, stat(1, 1), memory="MemFree: 1 kB\n")
    assert set(scrape(HostMetricsCollector(partial))) == {"nv_cpu_utilization"}


def test_this_machine_answers_in_range() -> None:
    values = scrape(HostMetricsCollector())
    assert 0.0 <= values["nv_cpu_utilization"] <= 1.0
    assert 0 < values["nv_cpu_memory_used_bytes"] < values["nv_cpu_memory_total_bytes"]


def test_allow_cpu_metrics_flag_is_honoured_and_passed_to_every_service() -> None:
    parser = argparse.ArgumentParser()
    add_server_flags(parser)
    assert server_flags_from(parser.parse_args([])).allow_cpu_metrics
    args = parser.parse_args(["--allow-cpu-metrics=false"])
    flags = server_flags_from(args)
    assert not flags.allow_cpu_metrics and flags.no_effect == ()
    mesh = argparse.ArgumentParser()
    add_server_flags(mesh, mesh=True)
    assert given_argv(mesh.parse_args(["--allow-cpu-metrics", "off"])) == [
        "--allow-cpu-metrics=off"
    ]
    with pytest.raises(ValueError, match="--allow-cpu-metrics"):
        server_flags_from(parser.parse_args(["--allow-cpu-metrics=maybe"]))
