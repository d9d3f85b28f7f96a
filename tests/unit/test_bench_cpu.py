"""The benchmark's CPU accounting: /proc parsing, the ceiling arithmetic and its formatting."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from benchmarks.cpu import (
    CpuUse,
    MachineTimes,
    ceiling,
    descendants,
    describe,
    fmt,
    parse_pid_stat,
    parse_proc_stat,
    per_inference,
    ticks_between,
    wait_child,
)
from benchmarks.report import (
    busy_machine_note,
    ceiling_note,
    ceiling_of,
    check_goals,
    derived,
    format_table,
)
from benchmarks.results import IN_PROCESS, Measurement

PROC_STAT = """\
cpu  1282637 10 329292 1961102 14958 0 24505 2341 0 0
cpu0 548684 0 147642 1094382 2515 0 11914 1103 0 0
cpu1 733952 10 181650 866719 12443 0 12590 1238 0 0
intr 123 4 5
ctxt 999
"""

PID_STAT = (
    "4242 (tricky) name) S 17 4242 4242 0 -1 4194560 3107 0 0 0 "
    "250 40 3 2 20 0 9 0 123456 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0"
)


def test_parse_proc_stat_sums_busy_and_idle() -> None:
    times = parse_proc_stat(PROC_STAT)
    assert times == MachineTimes(
        busy=1282637 + 10 + 329292 + 0 + 24505 + 2341, idle=1961102 + 14958
    )


def test_parse_proc_stat_old_kernel_and_garbage() -> None:
    assert parse_proc_stat("cpu 10 0 5 100\n") == MachineTimes(busy=15, idle=100)
    assert parse_proc_stat("intr 1 2\n") is None
    assert parse_proc_stat("cpu a b c\n") is None


def test_parse_pid_stat_with_parentheses_in_the_name() -> None:
    stat = parse_pid_stat(PID_STAT)
    assert stat is not None
    assert (stat.ppid, stat.utime, stat.stime, stat.cutime, stat.cstime) == (17, 250, 40, 3, 2)
    assert stat.starttime == 123456
    assert parse_pid_stat("garbage") is None
    assert parse_pid_stat("1 (x) S 0") is None


def test_descendants_walks_the_tree_from_the_roots() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 11, 20: 1, 21: 20, 30: 1}
    assert descendants(parents, [10, 30]) == {10, 11, 12, 30}
    assert descendants(parents, []) == set()


def test_ticks_between_counts_new_processes_whole_and_drops_ended_ones() -> None:
    before = {("p", 1, 5): 100, ("p", 2, 6): 50, ("t", 7, 9): 10}
    after = {("p", 1, 5): 130, ("p", 3, 8): 20, ("t", 7, 9): 15}
    assert ticks_between(before, after) == 30 + 20 + 5
    # a reused pid has another start time: it counts as new, not as a negative delta
    assert ticks_between({("p", 1, 5): 100}, {("p", 1, 99): 4}) == 4


def test_cpu_use_cores() -> None:
    use = CpuUse(wall_s=10.0, cpus=2, client_s=2.5, server_s=13.0, busy_s=17.0, idle_s=3.0)
    assert use.client_cores == pytest.approx(0.25)
    assert use.server_cores == pytest.approx(1.3)
    assert use.idle_cores == pytest.approx(0.3)
    assert use.other_cores == pytest.approx(2 - 0.3 - 0.25 - 1.3)
    unknown = CpuUse(wall_s=10.0, cpus=2)
    assert unknown.client_cores is None and unknown.idle_cores is None
    assert unknown.other_cores is None
    assert unknown.to_json()["server_cpu_s"] is None


def test_ceiling_arithmetic() -> None:
    # 1.65 core-ms per image of the model + 0.33 of perf_analyzer on 2 cores
    best = ceiling(2, 1.65e-3, 0.33e-3)
    assert best == pytest.approx(2 / 1.98e-3)
    assert ceiling(2, 0.0, 0.0) is None
    assert ceiling(0, 1e-3, 1e-3) is None
    assert ceiling(2, math.nan, 1e-3) is None
    assert per_inference(1.65, 1000.0) == pytest.approx(1.65e-3)
    assert per_inference(None, 1000.0) is None
    assert per_inference(1.0, 0.0) is None


def test_fmt_and_describe() -> None:
    assert fmt(None) == "n/a"
    assert fmt(math.nan) == "n/a"
    assert fmt(0.256) == "0.26"
    assert fmt(1.23456, 3) == "1.235"
    use = CpuUse(wall_s=10.0, cpus=2, client_s=2.5, server_s=13.0, busy_s=17.0, idle_s=3.0)
    assert describe(use) == "cores: pa 0.25, server 1.30, other 0.15, idle 0.30"
    assert describe(use, served=False).startswith("cores: process 1.30")
    assert describe(None) == "cores: n/a"


def _rows(pa_cpu_s: float) -> list[Measurement]:
    """cnn in-process best batched 1,200/s at 1.98 cores (1.65 core-ms), served c64 760/s."""
    local = CpuUse(wall_s=5.0, cpus=2, server_s=9.9, busy_s=10.0, idle_s=0.0)
    served = CpuUse(wall_s=10.0, cpus=2, client_s=pa_cpu_s, server_s=15.0, busy_s=18.0, idle_s=2.0)
    return [
        Measurement(IN_PROCESS, "cnn", 1, 900.0, 1.1, 1.3, cpu=local),
        Measurement(IN_PROCESS, "cnn", 64, 1200.0, 53.0, 55.0, cpu=local),
        Measurement("direct", "cnn", 64, 760.0, 80.0, 120.0, cpu=served),
    ]


def test_ceiling_of_a_served_row_uses_the_reference_and_the_rows_perf_analyzer() -> None:
    rows = _rows(pa_cpu_s=2.5)  # 0.25 cores at 760/s: 0.329 core-ms per inference
    found = ceiling_of(rows, rows[2])
    assert found is not None
    assert found.model_core_ms == pytest.approx(1.98 / 1200 * 1000)
    assert found.client_core_ms == pytest.approx(0.25 / 760 * 1000)
    assert found.infer_per_s == pytest.approx(2 / (1.98 / 1200 + 0.25 / 760))
    assert found.ratio == pytest.approx(found.infer_per_s / 1200)
    assert ceiling_of(rows, rows[1]) is None  # in-process rows have none
    no_cpu = [rows[0], rows[1], Measurement("direct", "cnn", 64, 760.0, 80.0, 120.0)]
    assert ceiling_of(no_cpu, no_cpu[2]) is None


def test_goal_line_explains_a_ceiling_below_the_goal() -> None:
    rows = _rows(pa_cpu_s=2.5)
    found = ceiling_of(rows, rows[2])
    assert found is not None and found.ratio < 0.9
    note = ceiling_note(0.9, found)
    assert (
        note
        == f" (ceiling here {found.ratio:.3f}: the goal needs the load generator on other cores)"
    )
    assert ceiling_note(0.5, found) == f" (ceiling here {found.ratio:.3f})"
    assert ceiling_note(0.9, None) == ""
    cnn = next(g for g in check_goals(rows) if g.goal.startswith("cnn"))
    assert cnn.status == "FAIL" and "load generator on other cores" in cnn.detail


def test_table_and_json_carry_the_cpu_columns() -> None:
    rows = _rows(pa_cpu_s=2.5)
    rows.append(Measurement("direct", "mlp", 1, 900.0, 1.0, 2.0))  # no CPU figures, no reference
    table = format_table(rows).splitlines()
    header = table[0].split()
    for column in ("pa", "srv", "other", "idle", "ceil"):
        assert column in header
    served = table[3]
    assert "0.25" in served and "1.50" in served and "0.20" in served
    assert table[4].count("n/a") >= 4
    document = derived(rows, rows[2])
    assert document["ceiling_ratio"] == pytest.approx(ceiling_of(rows, rows[2]).ratio)  # type: ignore[union-attr]
    assert document["server_core_ms_per_inference"] == pytest.approx(1.5 / 760 * 1000)
    assert rows[2].to_json()["cpu"]["client_cores"] == pytest.approx(0.25)


def test_wait_child_returns_the_exit_code_and_cpu_time() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    code, cpu_s, timed_out = wait_child(process, 30.0)
    assert (code, timed_out) == (3, False)
    assert process.returncode == 3
    assert cpu_s is None or cpu_s >= 0.0


def test_wait_child_kills_on_timeout() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    code, _, timed_out = wait_child(process, 0.5)
    assert timed_out and code != 0


def test_busy_machine_note_names_the_worst_row() -> None:
    rows = _rows(pa_cpu_s=2.5)  # other: in-process 0.02, served 0.05
    assert busy_machine_note(rows) == ""
    busy = CpuUse(wall_s=10.0, cpus=2, client_s=0.5, server_s=5.0, busy_s=19.0, idle_s=1.0)
    rows.append(Measurement("direct", "cnn", 16, 500.0, 30.0, 60.0, cpu=busy))
    note = busy_machine_note(rows)
    assert "1 of 4 rows" in note and "1.35 cores, direct cnn c16" in note
