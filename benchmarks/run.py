"""`python -m benchmarks.run` (`make bench`): served throughput and latency beside in-process ORT.

In one run: onnxruntime in this process on the repository's model files (the ceiling), then each
served target driven by perf_analyzer over gRPC: `direct` (the ONNX service on free ports, its
C++ grpc_front on the port where built), `direct-aio` (the same with grpc.aio on the port), and
`gateway` (the whole mesh, load through Envoy), each started and always stopped. Prints one table,
the gateway's overhead over direct, and PASS/FAIL for the issue's goals, and saves everything as
JSON under benchmarks/results/. Needs perf_analyzer from
benchmarks/setup_perf_analyzer.sh and the example models from `python -m examples.build_repository`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from tritonclient.utils import InferenceServerException

from benchmarks.cpu import describe
from benchmarks.inprocess import run_in_process
from benchmarks.perf import (
    PerfAnalyzerError,
    PerfOptions,
    run_perf_analyzer,
    write_input_data,
)
from benchmarks.report import (
    busy_machine_note,
    check_goals,
    format_gateway_table,
    format_goals,
    format_table,
    save_json,
)
from benchmarks.results import Measurement
from benchmarks.targets import (
    DEFAULT_SERVICE_CMD,
    ExistingTarget,
    GatewayTarget,
    ServiceTarget,
    Target,
    TargetError,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IN_PROCESS_SCENARIO, DIRECT, GATEWAY = "in-process", "direct", "gateway"
#: the service with grpc.aio on its port instead of grpc_front (where the front is built)
DIRECT_AIO = "direct-aio"
SCENARIOS = (IN_PROCESS_SCENARIO, DIRECT, DIRECT_AIO, GATEWAY)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _scenarios(text: str) -> list[str]:
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(SCENARIOS)}"
        )
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated model names")
    parser.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=3.0,
        help="seconds per in-process measurement and per perf_analyzer window (default 3)",
    )
    parser.add_argument("--concurrency", default="1,16,64", help="served concurrency levels")
    parser.add_argument("--batches", default="1,8,32,64", help="in-process batch sizes")
    parser.add_argument("--repository", type=Path, default=ROOT / "examples" / "models")
    parser.add_argument(
        "--service-cmd",
        default=DEFAULT_SERVICE_CMD,
        help="service command template; placeholders {python} {repository} {grpc_port} "
        "{http_port} {metrics_port}",
    )
    parser.add_argument(
        "--url",
        help="benchmark this running server (host:port, gRPC) instead of direct/gateway",
    )
    parser.add_argument("--intra-op-threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--perf-analyzer", type=Path, default=PerfOptions().binary)
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process rows")
    parser.add_argument("--no-served", action="store_true", help="skip the served rows")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal fails")
    return parser.parse_args(argv)


def build_targets(args: argparse.Namespace, models: Sequence[str], stamp: str) -> list[Target]:
    """The served scenarios chosen by --scenarios, in the order they run (direct, then gateway)."""
    if args.url:
        return [ExistingTarget(url=args.url, models=models)]
    targets: list[Target] = []
    for scenario, suffix, extra in ((DIRECT, "", ""), (DIRECT_AIO, "-aio", " --grpc-frontend aio")):
        if scenario in args.scenarios:
            targets.append(
                ServiceTarget(
                    repository=args.repository,
                    models=models,
                    log_path=args.results_dir / f"service{suffix}-{stamp}.log",
                    command_template=args.service_cmd + extra,
                    name=scenario,
                )
            )
    if GATEWAY in args.scenarios:
        targets.append(
            GatewayTarget(
                repository=args.repository,
                models=models,
                log_path=args.results_dir / f"mesh-{stamp}.log",
                name=GATEWAY,
            )
        )
    return targets


def run_target(
    target: Target,
    models: Sequence[str],
    concurrency: Sequence[int],
    options: PerfOptions,
    errors: list[str],
) -> list[Measurement]:
    """All perf_analyzer runs against one served target; failures are recorded, not raised."""
    rows: list[Measurement] = []
    try:
        with target.serve() as url, tempfile.TemporaryDirectory(prefix="meshserve-bench-") as tmp:
            for model in models:
                try:
                    data = write_input_data(url, model, Path(tmp), options.samples)
                except InferenceServerException as exc:
                    errors.append(f"[{target.name}] {model}: model config: {exc}")
                    print(f"  ERROR {model}: {exc}", file=sys.stderr)
                    continue
                for level in concurrency:
                    try:
                        server = target.server_processes()
                        row = run_perf_analyzer(
                            url, target.name, model, level, options, data, server
                        )
                    except PerfAnalyzerError as exc:
                        errors.append(f"[{target.name}] {exc}")
                        print(f"  ERROR {exc}", file=sys.stderr)
                        continue
                    rows.append(row)
                    print(
                        f"  {target.name} {model} c{level}: {row.infer_per_s:,.0f} infer/s, "
                        f"p50 {row.p50_ms:.3f} ms; {describe(row.cpu)}"
                    )
    except TargetError as exc:
        errors.append(f"[{target.name}] {exc}")
        print(f"  ERROR {exc}", file=sys.stderr)
    return rows


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the targets' context managers, so a started service is stopped.
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 unless nothing could be measured (or --strict and a goal failed)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    concurrency, batches = _ints(args.concurrency), _ints(args.batches)
    options = PerfOptions(
        binary=args.perf_analyzer,
        measurement_interval_ms=int(args.duration * 1000),
        timeout_s=max(120.0, 10 * args.duration * PerfOptions.max_trials),
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: list[Measurement] = []
    errors: list[str] = []

    if args.no_in_process:
        args.scenarios = [s for s in args.scenarios if s != IN_PROCESS_SCENARIO]
    if args.no_served:
        args.scenarios = [s for s in args.scenarios if s == IN_PROCESS_SCENARIO]
    served = [s for s in args.scenarios if s != IN_PROCESS_SCENARIO]
    if args.url and GATEWAY in served:
        print("--url: the gateway scenario needs a mesh it starts itself; skipped", file=sys.stderr)

    if IN_PROCESS_SCENARIO in args.scenarios:
        threads = args.intra_op_threads
        print(f"in-process onnxruntime (intra_op {threads}, {args.duration:g} s each)")
        rows += run_in_process(
            args.repository, models, batches, args.duration, args.intra_op_threads
        )
    if served:
        if not args.perf_analyzer.exists():
            sys.exit(f"{args.perf_analyzer} missing: run bash benchmarks/setup_perf_analyzer.sh")
        for target in build_targets(args, models, stamp):
            print(f"served: {target.name} (perf_analyzer over gRPC, concurrency {concurrency})")
            rows += run_target(target, models, concurrency, options, errors)

    goals = check_goals(rows)
    print()
    print(format_table(rows))
    busy = busy_machine_note(rows)
    if busy:
        print(busy)
    overhead = format_gateway_table(rows, DIRECT, GATEWAY)
    if overhead:
        print()
        print(overhead)
    print()
    print(format_goals(goals) if goals else "goals: no served rows, nothing checked")
    settings = {
        "models": models,
        "scenarios": args.scenarios,
        "concurrency": concurrency,
        "batches": batches,
        "duration_s": args.duration,
        "intra_op_threads": args.intra_op_threads,
        "url": args.url,
        "service_cmd": None if args.url else args.service_cmd,
        "perf": {k: str(v) for k, v in asdict(options).items()},
    }
    path = save_json(args.results_dir, rows, goals, settings, errors)
    print(f"\nresults: {path}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if not rows:
        return 1
    return 1 if args.strict and any(g.status == "FAIL" for g in goals) else 0


if __name__ == "__main__":
    sys.exit(main())
