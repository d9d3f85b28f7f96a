"""`python -m benchmarks.seed`: the framework-families issue's seed benchmark, scaled to here.

The published comparison ran ResNet-50 (SavedModel) over 32000 images at batch 32 and 10,
sequential requests, no dynamic batching, timed after warm-up: TensorFlow in-process 83 s, TF
Serving 1.45x, Triton 2.4x, a Falcon + msgpack server 1.39x. Here, in one run: ResNet-50 with
random weights (benchmarks/seed_models.py) for each framework family — TorchScript, ONNX,
TensorFlow SavedModel, and the same TorchScript model inside a Python-backend ``model.py`` — run

- **in-process**: the framework itself on the model file the service loads, alone in a process
  of its own with the service's settings (benchmarks/seed_inprocess.py), sequential batches;
- **gateway**: the same images through the whole mesh (``GatewayTarget``: control plane, Envoy,
  one service per family) with tritonclient gRPC from this process, raw binary tensors,
  sequential requests;
- **shm** (unless ``--no-shm``): the same calls through the gateway, but each batch is copied
  into a POSIX shared-memory region that the client registered through the gateway (Triton's
  system shared memory, ``tritonclient.utils.shared_memory``), so the request carries only the
  region's name; the scores come back in the response as before. This is how a Triton user on
  the same host moves large tensors; the copy into the region is timed.

Each (family, batch size) pair is timed over ``--images`` images per round, sequential calls
every way. By default the ways take turns batch by batch (``--interleave batch``; the order
rotates too) and each way's time is the sum of its calls, so bursts of load from elsewhere on
this shared machine hit all alike; ``--interleave run`` times each way's whole run as one block
instead (order reversed every round). Only ratios measured in one run are
meaningful. The gateway side also reads the service's own request and compute time
(ModelStatistics) to split the gap into framework time and transport. The Python family's
in-process baseline is the native TorchScript model, so its ratio is the Python backend's cost
over native torch.
Target: gateway ≤ 1.05x in-process for every family and batch size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import tritonclient.grpc as grpcclient

from benchmarks.seed_client import (
    COMPUTE,
    SERVICE,
    SharedRegion,
    Timer,
    check_shm_matches_wire,
    served_timer,
    service_seconds,
    shm_input,
    wire_input,
)
from benchmarks.seed_inprocess import InProcessWorker, images_for
from benchmarks.seed_models import FAMILIES, SeedModel, build_seed_repository, selected
from benchmarks.targets import GatewayTarget
from services.core.allocator import tune_for_tensors

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DESCRIPTION = "ResNet-50 in-process vs through the gateway, per framework family (the seed)."
#: the issue's target: served time over in-process time
TARGET_RATIO = 1.05
IN_PROCESS, GATEWAY, SHM = "in-process", "gateway", "shm"
#: the ways served through the mesh
SERVED = (GATEWAY, SHM)

# --- measuring ------------------------------------------------------------------------------------


def batches(count: int, batch: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive batches over ``count`` images (the last may be smaller)."""
    return [(i, min(i + batch, count)) for i in range(0, count, batch)]


#: warm-up goes on past ``--warmup`` calls (up to this many) until two calls in a row agree
WARMUP_LIMIT = 10
SETTLED = 0.10


def warm_up(timer: Timer, parts: Sequence[tuple[int, int]], calls: int) -> None:
    """At least ``calls`` calls at every distinct batch size, then more until settled.

    TorchScript's profiling executor optimizes per input shape over the first few runs; a size
    is settled when two consecutive calls differ by at most 10 % (or after WARMUP_LIMIT calls).
    """
    for start, stop in {stop - start: (start, stop) for start, stop in parts}.values():
        times: list[float] = []
        while len(times) < max(calls, 2) or (
            len(times) < WARMUP_LIMIT and abs(times[-1] - times[-2]) > SETTLED * times[-1]
        ):
            times.append(timer(start, stop))


@dataclass
class Pair:
    """In-process and gateway seconds of one family at one batch size, per round."""

    model: SeedModel
    batch: int
    images: int
    seconds: dict[str, list[float]] = field(
        default_factory=lambda: {IN_PROCESS: [], GATEWAY: [], SHM: [], SERVICE: [], COMPUTE: []}
    )
    #: per served way, its seconds over in-process seconds of each batch (``--interleave batch``)
    call_ratios: dict[str, list[float]] = field(default_factory=lambda: {way: [] for way in SERVED})

    @property
    def ratio(self) -> float:
        """Total gateway seconds over total in-process seconds."""
        return self.ratio_of(GATEWAY)

    def ratio_of(self, way: str) -> float:
        """Total seconds of a served way over total in-process seconds (nan: not measured)."""
        served = sum(self.seconds[way])
        return served / sum(self.seconds[IN_PROCESS]) if served else math.nan

    def round_ratios(self, way: str = GATEWAY) -> list[float]:
        return [g / i for i, g in zip(self.seconds[IN_PROCESS], self.seconds[way], strict=True)]

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.model.family,
            "model": self.model.name,
            "batch": self.batch,
            "images_per_round": self.images,
            "seconds": self.seconds,
            "call_ratios": self.call_ratios,
            "ratio": self.ratio,
            "shm_ratio": None if math.isnan(self.ratio_of(SHM)) else self.ratio_of(SHM),
        }


def measure_round(
    client: grpcclient.InferenceServerClient,
    pair: Pair,
    timers: dict[str, Timer],
    order: tuple[str, ...],
    interleave: str,
) -> None:
    """One round of a pair: both ways over every batch, plus the service's own account.

    ``batch``: the ways take turns batch by batch (the order rotates too) and each way's time is
    the sum of its calls, so a burst of load from elsewhere hits all alike. ``run``: each way's
    whole run as one block, in ``order``. The service's own seconds are read around each wire
    (``gateway``) call, outside the timing.
    """
    parts = batches(pair.images, pair.batch)
    totals = dict.fromkeys(order, 0.0)
    own = {SERVICE: 0.0, COMPUTE: 0.0}

    def call(way: str, start: int, stop: int) -> float:
        before = service_seconds(client, pair.model) if way == GATEWAY else {}
        seconds = timers[way](start, stop)
        if before:
            after = service_seconds(client, pair.model)
            for key, value in before.items():
                own[key] += after[key] - value
        return seconds

    if interleave == "run":
        for way in order:
            totals[way] = sum(call(way, start, stop) for start, stop in parts)
    else:
        for i, (start, stop) in enumerate(parts):
            turn = order[i % len(order) :] + order[: i % len(order)]
            took = {way: call(way, start, stop) for way in turn}
            for way in SERVED:
                if way in took:
                    pair.call_ratios[way].append(took[way] / took[IN_PROCESS])
            for way, seconds in took.items():
                totals[way] += seconds
    for way, total in totals.items():
        pair.seconds[way].append(total)
    for key, value in own.items():
        pair.seconds[key].append(value)


def measure(
    repository: Path, url: str, models: Sequence[SeedModel], args: argparse.Namespace
) -> list[Pair]:
    """Start the in-process workers, warm up every way, run the rounds; progress as it goes."""
    ways = (IN_PROCESS, GATEWAY, SHM) if args.shm else (IN_PROCESS, GATEWAY)
    with contextlib.ExitStack() as stack:
        client = grpcclient.InferenceServerClient(url)
        stack.callback(client.close)
        region: SharedRegion | None = None
        if args.shm:
            # the largest batch of the largest image layout (all families use 3x224x224 FP32)
            region = SharedRegion(client, "seed_input", max(args.batches) * 3 * 224 * 224 * 4)
            stack.callback(region.close)
        timers: dict[str, dict[str, Timer]] = {}
        for model in models:
            print(f"  {model.family}: in-process worker starting; warming up every way", flush=True)
            worker = InProcessWorker(repository, model, args.images)
            stack.callback(worker.close)
            images = images_for(model, args.images)
            timers[model.family] = {
                IN_PROCESS: worker.run,
                GATEWAY: served_timer(client, model, images, wire_input(model)),
            }
            if region is not None:
                check_shm_matches_wire(client, model, images, region)
                into_region = shm_input(model, region)
                timers[model.family][SHM] = served_timer(client, model, images, into_region)
            for batch in args.batches:
                for timer in timers[model.family].values():
                    warm_up(timer, batches(args.images, batch), args.warmup)
        pairs = [Pair(m, b, args.images) for m in models for b in args.batches]
        for r in range(args.rounds):
            order = ways if r % 2 == 0 else ways[::-1]
            for pair in pairs:
                measure_round(client, pair, timers[pair.model.family], order, args.interleave)
                shared = (
                    f" shm {pair.seconds[SHM][-1]:7.2f} s ({pair.round_ratios(SHM)[-1]:.3f}x)"
                    if args.shm
                    else ""
                )
                print(
                    f"  round {r + 1}/{args.rounds} {pair.model.family:<10} b{pair.batch:<3}"
                    f" in-process {pair.seconds[IN_PROCESS][-1]:7.2f} s"
                    f"  gateway {pair.seconds[GATEWAY][-1]:7.2f} s"
                    f" ({pair.round_ratios()[-1]:.3f}x; service {pair.seconds[SERVICE][-1]:.2f} s,"
                    f" compute {pair.seconds[COMPUTE][-1]:.2f} s){shared}",
                    flush=True,
                )
        return pairs


# --- reporting ------------------------------------------------------------------------------------


def format_table(pairs: Sequence[Pair], target: float) -> str:
    """One row per family and batch size: seconds each way, ratios, PASS/FAIL per served way.

    ``ratio``: total gateway over total in-process seconds (the issue's measure); ``p50 batch``:
    the median of the per-batch ratios (robust to bursts of load from elsewhere); ``rounds``: the
    range of the per-round ratios. ``compute s``: the framework's execution inside the service
    during the gateway calls (ModelStatistics), to compare with ``in-process s``.
    ``transport ms/req``: gateway time minus the service's own request time, per request: the
    client's encoding, the two gRPC hops through Envoy, the service's receive and parse.
    ``shm s`` / ``shm ratio``: the same through the gateway with the input in shared memory
    (``-`` when not measured).
    """
    lines = [
        f"{'family':<11}{'batch':>5}{'images':>7}{'in-process s':>13}{'gateway s':>10}"
        f"{'ratio':>7}{'p50 batch':>10}  {'rounds':<10}{'compute s':>10}{'transport ms/req':>17}"
        f"  ≤ {target:.2f}x{'shm s':>9}{'shm ratio':>10}  ≤ {target:.2f}x"
    ]
    for p in pairs:
        rounds = p.round_ratios()
        spread = f"{min(rounds):.2f}-{max(rounds):.2f}" if len(rounds) > 1 else ""
        median = (
            f"{statistics.median(p.call_ratios[GATEWAY]):.3f}" if p.call_ratios[GATEWAY] else "-"
        )
        requests = math.ceil(p.images / p.batch) * len(rounds)
        transport_ms = (sum(p.seconds[GATEWAY]) - sum(p.seconds[SERVICE])) / requests * 1e3
        shm_ratio = p.ratio_of(SHM)
        shm_cells = (
            f"{'-':>9}{'-':>10}  {'-':<4}"
            if math.isnan(shm_ratio)
            else f"{sum(p.seconds[SHM]):>9.2f}{shm_ratio:>10.3f}  {_verdict(shm_ratio, target)}"
        )
        lines.append(
            f"{p.model.family:<11}{p.batch:>5}{p.images * len(rounds):>7}"
            f"{sum(p.seconds[IN_PROCESS]):>13.2f}{sum(p.seconds[GATEWAY]):>10.2f}"
            f"{p.ratio:>7.3f}{median:>10}  {spread:<10}{sum(p.seconds[COMPUTE]):>10.2f}"
            f"{transport_ms:>17.1f}  {_verdict(p.ratio, target)}   {shm_cells}"
        )
    return "\n".join(lines)


def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "FAIL"


def save_json(pairs: Sequence[Pair], args: argparse.Namespace, log: Path) -> Path:
    """benchmarks/results/seed-<stamp>.json with every round's seconds."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"seed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    document = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {
            "images": args.images,
            "rounds": args.rounds,
            "batches": args.batches,
            "warmup": args.warmup,
            "interleave": args.interleave,
            "tune_client_malloc": args.tune_client_malloc,
            "shm": args.shm,
            "target": args.target,
            "mesh_log": str(log),
        },
        "pairs": [p.to_json() for p in pairs],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


# --- command line ---------------------------------------------------------------------------------


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.seed", description=DESCRIPTION)
    p.add_argument("--images", type=int, default=160, help="images per batch size, family, round")
    p.add_argument("--rounds", type=int, default=2, help="in-process/gateway alternations")
    p.add_argument("--batches", type=lambda t: [int(v) for v in _list(t)], default=[32, 10])
    p.add_argument("--families", type=_list, default=list(FAMILIES), help=",".join(FAMILIES))
    p.add_argument(
        "--interleave",
        choices=("batch", "run"),
        default="batch",
        help="alternate in-process and gateway every batch (default) or every whole run",
    )
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per batch shape and way")
    p.add_argument("--target", type=float, default=TARGET_RATIO, help="gateway/in-process goal")
    p.add_argument("--model-repository", type=Path, help="build here and keep (default: temp)")
    p.add_argument(
        "--no-shm",
        dest="shm",
        action="store_false",
        help="skip the third way (inputs in system shared memory, through the gateway)",
    )
    p.add_argument(
        "--tune-client-malloc",
        action="store_true",
        help="give this (client) process the torch service's malloc settings (default: glibc's)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a ratio misses the target")
    args = p.parse_args(argv)
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown or not args.families:
        p.error(f"--families: unknown {unknown or '(none)'}; choose from {', '.join(FAMILIES)}")
    if args.images < 1 or args.rounds < 1 or not args.batches or min(args.batches) < 1:
        p.error("--images, --rounds and --batches must be positive")
    if max(args.batches) > 32:
        p.error("--batches: the models' max_batch_size is 32")
    return args


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)  # unwinds through GatewayTarget.serve, which stops the mesh


def run(repository: Path, args: argparse.Namespace) -> int:
    """Build the models, start the mesh, measure, report; the mesh is always stopped."""
    models = selected(args.families)
    started = time.perf_counter()
    print(f"building ResNet-50 ({', '.join(args.families)}) into {repository}", flush=True)
    build_seed_repository(repository, args.families)
    log = RESULTS / f"mesh-seed-{time.strftime('%Y%m%d-%H%M%S')}.log"
    target = GatewayTarget(repository, [m.name for m in models], log, ready_timeout_s=300.0)
    with target.serve() as url:
        pairs = measure(repository, url, models, args)
    print(
        f"\nResNet-50, random weights, sequential batches, no dynamic batching "
        f"({args.rounds} rounds of {args.images} images; whole run "
        f"{time.perf_counter() - started:.0f} s)"
    )
    print(format_table(pairs, args.target))
    print(
        "python: the Python backend running the TorchScript model, against that model in-process"
        "\nseed (TF SavedModel, 32000 images, batch 32 and 10; ratios over TF in-process): "
        "TF Serving 1.45x, Triton 2.40x, Falcon + msgpack 1.39x"
    )
    print(f"saved {save_json(pairs, args, log)}")
    failed = [p for p in pairs if p.ratio > args.target]
    return 1 if failed and args.strict else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tune_client_malloc and not tune_for_tensors():
        print("--tune-client-malloc: not applied (not glibc, or MALLOC_* set)", file=sys.stderr)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.model_repository is not None:
        return run(args.model_repository, args)
    with tempfile.TemporaryDirectory(prefix="meshserve-seed-") as tmp:
        return run(Path(tmp) / "models", args)


if __name__ == "__main__":
    sys.exit(main())
