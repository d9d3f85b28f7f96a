"""Driving perf_analyzer against a served target and reading its CSV report.

The input data is built from the served model's own configuration (read over gRPC with
tritonclient), so perf_analyzer sends real, finite values (its default random bits can contain
NaN/Inf) of exactly the shape and type the server expects.
"""

from __future__ import annotations

import csv
import json
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from benchmarks.cpu import CpuUse, Meter, Processes, wait_child
from benchmarks.results import Measurement

DEFAULT_PERF_ANALYZER = Path(__file__).resolve().parent / ".tools" / "perf_analyzer"
LOOSE_STABILITY = 100
"""Stability percentage of the retry when the first run never stabilises."""


@dataclass(frozen=True)
class PerfOptions:
    """How perf_analyzer measures each concurrency level."""

    binary: Path = DEFAULT_PERF_ANALYZER
    """The perf_analyzer executable (the wrapper written by setup_perf_analyzer.sh)."""
    measurement_interval_ms: int = 3000
    """Length of one measurement window."""
    stability_percent: int = 25
    """Allowed max/min spread of the last three windows before a result counts as stable."""
    max_trials: int = 5
    """Windows to try before giving up on stability."""
    timeout_s: float = 120.0
    """Hard limit for one perf_analyzer run."""
    samples: int = 4
    """Distinct input tensors perf_analyzer cycles through."""


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer failed or produced no report."""


def _sample(datatype: str, shape: list[int], rng: np.random.Generator) -> list[Any]:
    """Flattened finite values for one tensor of a Triton datatype."""
    count = int(np.prod(shape)) if shape else 1
    if datatype in ("FP32", "FP64", "FP16", "BF16"):
        return [round(float(v), 4) for v in rng.uniform(-1.0, 1.0, size=count)]
    if datatype == "BOOL":
        return [bool(v) for v in rng.integers(0, 2, size=count)]
    if datatype == "BYTES":
        return [str(int(v)) for v in rng.integers(0, 10, size=count)]
    return [int(v) for v in rng.integers(0, 10, size=count)]


def input_data(url: str, model: str, samples: int, seed: int = 0) -> dict[str, Any]:
    """perf_analyzer `--input-data` JSON for `model`, from the server's model config."""
    client = grpcclient.InferenceServerClient(url)
    try:
        config = client.get_model_config(model, as_json=True)["config"]
    finally:
        client.close()
    rng = np.random.default_rng(seed)
    entries = []
    for _ in range(samples):
        entry: dict[str, Any] = {}
        for tensor in config.get("input", []):
            # Config dims exclude the batch dimension when max_batch_size > 0, which is what
            # perf_analyzer expects per request at -b 1; variable dims (-1) become 1.
            shape = [max(1, int(d)) for d in tensor.get("dims", [])]
            datatype = str(tensor["data_type"]).removeprefix("TYPE_").replace("STRING", "BYTES")
            entry[tensor["name"]] = {"content": _sample(datatype, shape, rng), "shape": shape}
        entries.append(entry)
    return {"data": entries}


def parse_report(path: Path) -> dict[str, str]:
    """The first data row of perf_analyzer's `-f` CSV (latencies there are in microseconds)."""
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("Concurrency")]
    if not rows:
        raise PerfAnalyzerError(f"no rows in perf_analyzer report {path}")
    return rows[0]


def _command(
    url: str, model: str, concurrency: int, options: PerfOptions, data_file: Path, report: Path
) -> list[str]:
    return [
        str(options.binary),
        *("-i", "grpc", "-u", url, "-m", model, "--async"),
        *("--concurrency-range", str(concurrency), "--input-data", str(data_file)),
        *("--measurement-interval", str(options.measurement_interval_ms)),
        *("--stability-percentage", str(options.stability_percent)),
        *("--max-trials", str(options.max_trials), "-f", str(report)),
    ]


def _attempt(
    command: list[str], report: Path, timeout_s: float, server: Processes | None
) -> tuple[dict[str, str] | None, str, CpuUse]:
    """Run perf_analyzer once: (the report row or None, its output, the CPU used meanwhile)."""
    report.unlink(missing_ok=True)
    with tempfile.TemporaryFile() as out:
        meter = Meter(server)
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        code, client_s, timed_out = wait_child(process, timeout_s)
        use = meter.finish(client_s)
        out.seek(0)
        output = out.read().decode(errors="replace")
    if timed_out:
        return None, f"timed out after {timeout_s:.0f} s", use
    if code != 0 or not report.exists():
        tail = "\n".join(output.strip().splitlines()[-8:])
        return None, f"exited {code}:\n{tail}", use
    return parse_report(report), output, use


def run_perf_analyzer(
    url: str,
    scenario: str,
    model: str,
    concurrency: int,
    options: PerfOptions,
    data_file: Path,
    server: Processes | None = None,
) -> Measurement:
    """One perf_analyzer run over gRPC at one concurrency level.

    The row's `cpu` covers the attempt that produced it: perf_analyzer's own CPU time, the CPU
    time of `server`'s processes (None: not measured) and the machine's busy/idle time.

    perf_analyzer reports nothing when its windows never agree within the stability percentage
    (likely on a small, shared machine); the run is then repeated once with LOOSE_STABILITY and
    the row says so in its note.
    """
    note = ""
    with tempfile.TemporaryDirectory(prefix="meshserve-pa-") as tmp:
        report = Path(tmp) / "report.csv"
        command = _command(url, model, concurrency, options, data_file, report)
        row, output, use = _attempt(command, report, options.timeout_s, server)
        if row is None and "stable measurement" in output:
            loose = replace(options, stability_percent=LOOSE_STABILITY, max_trials=4)
            command = _command(url, model, concurrency, loose, data_file, report)
            row, output, use = _attempt(command, report, options.timeout_s, server)
            note = f"stable only within {LOOSE_STABILITY}%"
        if row is None:
            raise PerfAnalyzerError(f"perf_analyzer {model} c{concurrency} {output}")
    return Measurement(
        scenario=scenario,
        model=model,
        load=concurrency,
        infer_per_s=float(row["Inferences/Second"]),
        p50_ms=float(row["p50 latency"]) / 1000.0,
        p99_ms=float(row["p99 latency"]) / 1000.0,
        note=note,
        cpu=use,
    )


def write_input_data(url: str, model: str, directory: Path, samples: int) -> Path:
    """Write the `--input-data` file for `model` into `directory` and return its path."""
    path = directory / f"{model}.input.json"
    path.write_text(json.dumps(input_data(url, model, samples)))
    return path
