"""`python -m benchmarks.ensemble`: an ensemble vs the client chaining its steps itself.

Both through the gateway, in one run, on one mesh: the ensemble (default ``chain3``, three steps
in a row) called as one model, and the same steps called one after another by this client,
following the ensemble's own ``ensemble_scheduling`` (read from the gateway's ModelConfig, so the
two do exactly the same work). Calls alternate in rounds (ensemble round, chain round, ...) so
noise on this shared machine hits both alike; sequential calls (concurrency 1) measure latency,
then a few client threads measure throughput. Both paths use the same raw gRPC stub, so client
overhead is equal. With the default repository a third path runs beside them: a copy of the
ensemble with ``step_routing: gateway`` (its steps through Envoy rather than straight to the
step's service by the gateway's routes). Reports p50/p90 latency, the ensemble's added
latency per step over the client chain, and PASS/FAIL for the issue's targets (≤ 1 ms added per
step at p50; ensemble no slower than the client-side chain).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from benchmarks.results import percentile
from benchmarks.targets import GatewayTarget
from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes
from services.core.gateway_client import CHANNEL_OPTIONS, WireTensor, infer_message

#: the issue's target for the ensemble's added latency per step at p50
ADDED_PER_STEP_MS = 1.0


def _sample_inputs(config: mc.ModelConfig, batch: int, seed: int) -> dict[str, WireTensor]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for io in config.input:
        datatype = dtypes.triton_from_config(io.data_type)
        shape = ([batch] if config.max_batch_size > 0 else []) + [
            d if d > 0 else 1 for d in io.dims
        ]
        if datatype == "BYTES":
            array = np.array([b"x" * 8] * int(np.prod(shape)), dtype=object).reshape(shape)
        else:
            array = rng.integers(0, 100, shape).astype(dtypes.lookup(datatype, io.name).numpy)
        tensors[io.name] = WireTensor.from_array(datatype, array)
    return tensors


def _reply_tensors(reply: pb.ModelInferResponse) -> dict[str, WireTensor]:
    return {
        o.name: WireTensor(o.datatype, tuple(o.shape), raw)
        for o, raw in zip(reply.outputs, reply.raw_output_contents, strict=True)
    }


def ensemble_call(
    stub: pbg.GRPCInferenceServiceStub, config: mc.ModelConfig, inputs: dict[str, WireTensor]
) -> Callable[[], None]:
    message = infer_message(config.name, "", inputs, [o.name for o in config.output])
    return lambda: stub.ModelInfer(message)


def client_chain_call(
    stub: pbg.GRPCInferenceServiceStub, config: mc.ModelConfig, inputs: dict[str, WireTensor]
) -> Callable[[], None]:
    """Run the ensemble's steps from the client, in config order (they are listed in order)."""

    def run() -> None:
        tensors = dict(inputs)
        for step in config.ensemble_scheduling.step:
            message = infer_message(
                step.model_name,
                "" if step.model_version <= 0 else str(step.model_version),
                {k: tensors[v] for k, v in step.input_map.items()},
                list(step.output_map),
            )
            produced = _reply_tensors(stub.ModelInfer(message))
            for key, tensor in step.output_map.items():
                tensors[tensor] = produced[key]

    return run


def _timed(call: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _throughput(call: Callable[[], None], threads: int, seconds: float) -> float:
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            call()
            counts[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / seconds


def measure(
    url: str, ensemble: str, rounds: int, per_round: int, threads: int, via_gateway: str = ""
) -> int:
    with grpc.insecure_channel(url, options=CHANNEL_OPTIONS) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        config = stub.ModelConfig(pb.ModelConfigRequest(name=ensemble)).config
        steps = len(config.ensemble_scheduling.step)
        inputs = _sample_inputs(config, 1, seed=0)
        paths = {
            "ensemble": ensemble_call(stub, config, inputs),
            "client chain": client_chain_call(stub, config, inputs),
        }
        if via_gateway:  # the same ensemble with step_routing: gateway (steps through Envoy)
            gateway_config = stub.ModelConfig(pb.ModelConfigRequest(name=via_gateway)).config
            paths["steps via gw"] = ensemble_call(stub, gateway_config, inputs)
        for call in paths.values():  # warm-up: connections, first batches
            _timed(call, 50)
        samples: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for name, call in paths.items():
                samples[name] += _timed(call, per_round)
        rates = {
            name: statistics.median(_throughput(call, threads, 2.0) for _ in range(3))
            for name, call in paths.items()
        }
    print(f"\n{ensemble}: {steps} steps, batch 1, {rounds * per_round} sequential calls each")
    print(f"{'path':<14}{'p50 ms':>9}{'p90 ms':>9}{f'{threads} threads/s':>16}")
    p50 = {}
    for name, values in samples.items():
        ordered = sorted(values)
        p50[name] = percentile(ordered, 50)
        p90 = percentile(ordered, 90)
        print(f"{name:<14}{p50[name]:>9.3f}{p90:>9.3f}{rates[name]:>16.0f}")
    added = (p50["ensemble"] - p50["client chain"]) / steps
    ratio = p50["ensemble"] / p50["client chain"]
    ok_added = added <= ADDED_PER_STEP_MS
    ok_ratio = ratio <= 1.0
    print(
        f"ensemble added per step at p50: {added:+.3f} ms (target ≤ {ADDED_PER_STEP_MS} ms): "
        f"{'PASS' if ok_added else 'FAIL'}"
    )
    print(
        f"ensemble / client chain p50: {ratio:.2f}x (target ≤ 1.00x): "
        f"{'PASS' if ok_ratio else 'FAIL'}; throughput ratio "
        f"{rates['ensemble'] / rates['client chain']:.2f}x"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ensemble", description=__doc__)
    p.add_argument(
        "--model-repository",
        type=Path,
        help="repository to serve (default: a fresh one with just the ensemble and its steps)",
    )
    p.add_argument("--ensemble", default="chain3")
    p.add_argument("--url", help="an already running gateway (host:port) instead of a new mesh")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args(argv)
    if args.url:
        return measure(args.url, args.ensemble, args.rounds, args.per_round, args.threads)
    log = Path(tempfile.gettempdir()) / "meshserve-bench-ensemble.log"
    with tempfile.TemporaryDirectory(prefix="meshserve-bench-ensemble-") as tmp:
        repository = args.model_repository
        via_gateway = ""
        if repository is None:
            from examples.build_ensemble import (
                build_ensemble_repository,
                write_gateway_routed_copy,
            )

            repository = Path(tmp) / "models"
            build_ensemble_repository(repository, [args.ensemble])
            via_gateway = write_gateway_routed_copy(repository, args.ensemble)
        models = [m for m in (args.ensemble, via_gateway) if m]
        target = GatewayTarget(repository, models, log)
        with target.serve() as url:
            return measure(
                url, args.ensemble, args.rounds, args.per_round, args.threads, via_gateway
            )


if __name__ == "__main__":
    sys.exit(main())
