"""CPU accounting for the benchmark: who used the machine's cores during one measurement.

On a small machine the load generator, the server and everything else share the same cores, so a
served figure means little without knowing where the CPU went. For one measurement interval this
module gives (as a `CpuUse`):

- **client**: perf_analyzer's CPU seconds, from the rusage that `os.wait4` returns when the child
  is reaped (its threads and any children it reaped; the wrapper script `exec`s the real binary,
  so the child *is* perf_analyzer);
- **server**: the server's processes, from `/proc/<pid>/stat` (utime + stime of the process, which
  covers all its threads, plus cutime + cstime of reaped children), each root process with all
  its descendants, plus single threads of this process (`/proc/self/task/<tid>/stat`); for an
  in-process measurement, this process's `time.process_time()`;
- **machine**: busy and idle time of all CPUs from the first line of `/proc/stat`.

`ceiling` turns per-inference CPU costs into the best throughput a served row could reach if the
server itself cost nothing. Linux only: elsewhere the /proc figures are None (printed "n/a") and
perf_analyzer's rusage is taken only where `os.wait4` exists.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
NOT_AVAILABLE = "n/a"


def clock_ticks() -> int:
    """Clock ticks per second of /proc's time fields (100 almost everywhere)."""
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


@dataclass(frozen=True)
class Processes:
    """What counts as "the server": whole processes (with their threads and descendants) and
    single threads of this process (e.g. the benchmark's own thread running the mesh's loop)."""

    pids: tuple[int, ...] = ()
    threads: tuple[int, ...] = ()
    """Native thread ids (`threading.Thread.native_id`) inside this process."""


@dataclass(frozen=True)
class MachineTimes:
    """Cumulative CPU time of all CPUs together, in clock ticks, from `/proc/stat`."""

    busy: int
    """user + nice + system + irq + softirq + steal (guest time is already inside user/nice)."""
    idle: int
    """idle + iowait."""


@dataclass(frozen=True)
class ProcStat:
    """The fields of `/proc/<pid>/stat` (or `.../task/<tid>/stat`) that the accounting needs."""

    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int
    starttime: int


def parse_proc_stat(text: str) -> MachineTimes | None:
    """The aggregate `cpu` line of `/proc/stat`; None if it is missing or malformed."""
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] != "cpu":
            continue
        try:
            values = [int(v) for v in fields[1:]] + [0] * 8
        except ValueError:
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
        return MachineTimes(busy=user + nice + system + irq + softirq + steal, idle=idle + iowait)
    return None


def parse_pid_stat(text: str) -> ProcStat | None:
    """Parse `/proc/<pid>/stat`; the command name (2nd field) may hold spaces and parentheses."""
    head, sep, tail = text.rpartition(")")
    if not sep or "(" not in head:
        return None
    fields = tail.split()
    # fields[0] is the state (field 3 of proc(5)); field n of proc(5) is fields[n - 3]
    try:
        return ProcStat(
            ppid=int(fields[1]),
            utime=int(fields[11]),
            stime=int(fields[12]),
            cutime=int(fields[13]),
            cstime=int(fields[14]),
            starttime=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_machine() -> MachineTimes | None:
    """The machine's cumulative busy/idle ticks now; None where there is no /proc/stat."""
    text = _read(PROC / "stat")
    return None if text is None else parse_proc_stat(text)


def process_table() -> dict[int, ProcStat]:
    """Every process visible in /proc right now, by pid (processes that vanish are skipped)."""
    table: dict[int, ProcStat] = {}
    try:
        entries = list(PROC.iterdir())
    except OSError:
        return table
    for entry in entries:
        if not entry.name.isdigit():
            continue
        text = _read(entry / "stat")
        stat = None if text is None else parse_pid_stat(text)
        if stat is not None:
            table[int(entry.name)] = stat
    return table


def descendants(parents: Mapping[int, int], roots: Iterable[int]) -> set[int]:
    """`roots` and every process below them, given each pid's parent pid."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


Snapshot = dict[tuple[str, int, int], int]
"""CPU ticks by ("p", pid, starttime) for processes and ("t", tid, starttime) for threads."""


def snapshot(server: Processes) -> Snapshot | None:
    """The server's cumulative CPU ticks now; None where /proc is unavailable."""
    if not (PROC / "self" / "stat").exists():
        return None
    ticks: Snapshot = {}
    if server.pids:
        table = process_table()
        parents = {pid: stat.ppid for pid, stat in table.items()}
        for pid in descendants(parents, (p for p in server.pids if p in table)):
            s = table[pid]
            ticks["p", pid, s.starttime] = s.utime + s.stime + s.cutime + s.cstime
    own = PROC / str(os.getpid()) / "task"
    for tid in server.threads:
        text = _read(own / str(tid) / "stat")
        stat = None if text is None else parse_pid_stat(text)
        if stat is not None:
            ticks["t", tid, stat.starttime] = stat.utime + stat.stime
    return ticks


def ticks_between(before: Snapshot, after: Snapshot) -> int:
    """Ticks used between two snapshots by what is alive at the end (a process started in
    between counts whole; one that ended in between is lost unless a server process reaped it)."""
    return sum(max(0, value - before.get(key, 0)) for key, value in after.items())


@dataclass(frozen=True)
class CpuUse:
    """Where the CPU went during one measurement (seconds; None where not measurable)."""

    wall_s: float
    """Length of the interval."""
    cpus: int | None
    """`os.cpu_count()`."""
    client_s: float | None = None
    """perf_analyzer's CPU seconds (served rows only)."""
    server_s: float | None = None
    """The server's CPU seconds; in-process rows: this process (onnxruntime's threads)."""
    busy_s: float | None = None
    """Busy CPU seconds of the whole machine (all CPUs together)."""
    idle_s: float | None = None
    """Idle CPU seconds of the whole machine (all CPUs together)."""

    def _cores(self, seconds: float | None) -> float | None:
        if seconds is None or self.wall_s <= 0:
            return None
        return seconds / self.wall_s

    @property
    def client_cores(self) -> float | None:
        """Cores used on average by perf_analyzer."""
        return self._cores(self.client_s)

    @property
    def server_cores(self) -> float | None:
        """Cores used on average by the server (in-process: by this process)."""
        return self._cores(self.server_s)

    @property
    def idle_cores(self) -> float | None:
        """Idle cores on average: the machine's idle share times `cpus`."""
        if self.busy_s is None or self.idle_s is None or not self.cpus:
            return None
        total = self.busy_s + self.idle_s
        return self.idle_s / total * self.cpus if total > 0 else None

    @property
    def other_cores(self) -> float | None:
        """Cores busy with anything else: the machine's busy cores minus client and server
        (other processes, the benchmark process itself, kernel interrupt work)."""
        idle = self.idle_cores
        if idle is None or not self.cpus or self.server_s is None:
            return None
        used = (self.client_cores or 0.0) + (self.server_cores or 0.0)
        return max(0.0, self.cpus - idle - used)

    def to_json(self) -> dict[str, float | int | None]:
        """Raw figures and the per-core averages, JSON-ready."""
        return {
            "wall_s": self.wall_s,
            "cpus": self.cpus,
            "client_cpu_s": self.client_s,
            "server_cpu_s": self.server_s,
            "machine_busy_cpu_s": self.busy_s,
            "machine_idle_cpu_s": self.idle_s,
            "client_cores": self.client_cores,
            "server_cores": self.server_cores,
            "other_cores": self.other_cores,
            "idle_cores": self.idle_cores,
        }


class Meter:
    """Takes the "before" snapshots when created; `finish` returns the `CpuUse` since then."""

    def __init__(self, server: Processes | None = None) -> None:
        self._server = server
        self._ticks = clock_ticks()
        self._server_before = None if server is None else snapshot(server)
        self._machine_before = read_machine()
        self._process_before = time.process_time()
        self._start = time.perf_counter()

    def finish(self, client_s: float | None = None, *, this_process: bool = False) -> CpuUse:
        """The interval's `CpuUse`: `client_s` as measured by the caller; the server from /proc,
        or this process's CPU time when `this_process` (an in-process measurement)."""
        wall = time.perf_counter() - self._start
        process_s = time.process_time() - self._process_before
        machine = read_machine()
        server_s: float | None = None
        if this_process:
            server_s = process_s
        elif self._server is not None and self._server_before is not None:
            after = snapshot(self._server)
            if after is not None:
                server_s = ticks_between(self._server_before, after) / self._ticks
        busy_s = idle_s = None
        if self._machine_before is not None and machine is not None:
            busy_s = (machine.busy - self._machine_before.busy) / self._ticks
            idle_s = (machine.idle - self._machine_before.idle) / self._ticks
        return CpuUse(
            wall_s=wall,
            cpus=os.cpu_count(),
            client_s=client_s,
            server_s=server_s,
            busy_s=busy_s,
            idle_s=idle_s,
        )


def wait_child(
    process: subprocess.Popen[bytes], timeout_s: float
) -> tuple[int, float | None, bool]:
    """Wait for `process` (killing it after `timeout_s`): (exit code, its CPU seconds, timed out).

    The child is reaped with `os.wait4`, whose rusage holds the CPU time of all its threads; the
    kill on timeout is a plain `os.kill` under a lock, never after the pid was reaped. Without
    `os.wait4` the CPU seconds are None.
    """
    if not hasattr(os, "wait4"):
        try:
            return process.wait(timeout_s), None, False
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(), None, True
    lock = threading.Lock()
    reaped = False
    timed_out = False

    def kill() -> None:
        nonlocal timed_out
        with lock:
            if not reaped:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill)
    timer.daemon = True
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
        with lock:
            reaped = True
    finally:
        timer.cancel()
        with lock:
            if not reaped:  # interrupted (Ctrl-C, SIGTERM): do not leave perf_analyzer running
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.wait4(process.pid, 0)
                reaped = True
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code  # reaped here: Popen must not wait for it again
    return code, usage.ru_utime + usage.ru_stime, timed_out


def ceiling(cpus: int, model_core_s: float, client_core_s: float) -> float | None:
    """Best infer/s if the server cost nothing: x with x * (model + client) = cpus.

    `model_core_s` is the model's CPU seconds per inference (from an in-process row),
    `client_core_s` the load generator's CPU seconds per inference (from the served row).
    """
    per_inference = model_core_s + client_core_s
    if cpus <= 0 or per_inference <= 0 or math.isnan(per_inference):
        return None
    return cpus / per_inference


def per_inference(cores: float | None, infer_per_s: float) -> float | None:
    """CPU seconds per inference from average cores and throughput."""
    if cores is None or infer_per_s <= 0 or math.isnan(infer_per_s):
        return None
    return cores / infer_per_s


def fmt(value: float | None, digits: int = 2) -> str:
    """`value` with `digits` decimals, or "n/a"."""
    return NOT_AVAILABLE if value is None or math.isnan(value) else f"{value:.{digits}f}"


def describe(use: CpuUse | None, *, served: bool = True) -> str:
    """A progress-line summary, e.g. "cores: pa 0.25, server 1.52, other 0.05, idle 0.18";
    in-process (`served` false) the server is this process and there is no perf_analyzer."""
    if use is None:
        return f"cores: {NOT_AVAILABLE}"
    parts = [
        f"pa {fmt(use.client_cores)}" if served else "",
        f"{'server' if served else 'process'} {fmt(use.server_cores)}",
        f"other {fmt(use.other_cores)}",
        f"idle {fmt(use.idle_cores)}",
    ]
    return "cores: " + ", ".join(p for p in parts if p)
