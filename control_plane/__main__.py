"""Control plane process: ``python -m control_plane [--control-port 8010] [--consul ADDR]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from control_plane.app import ControlPlane, ControlPlaneSettings
from control_plane.gateway_tls import add_tls_flags, tls_from_args
from control_plane.tracing import gateway_tracing
from services.core import trace_config
from services.core.server_flags import triton_bool

log = logging.getLogger("control_plane")


def settings_from_args(argv: Sequence[str] | None) -> ControlPlaneSettings:
    p = argparse.ArgumentParser(prog="python -m control_plane", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--control-port", type=int, default=8010, help="ADS + embedded registry (gRPC)")
    p.add_argument("--front-grpc-port", type=int, default=0)
    p.add_argument("--front-http-port", type=int, default=0)
    p.add_argument("--gateway-grpc-port", type=int, default=8001)
    p.add_argument("--gateway-http-port", type=int, default=8000)
    p.add_argument("--policy-file", type=Path, default=None, help="where traffic splits persist")
    p.add_argument("--consul", default="", help="Consul agent address (default: embedded registry)")
    p.add_argument(
        "--registry-file",
        type=Path,
        default=None,
        help="save the embedded registry here; a restart configures Envoy from it at once",
    )
    p.add_argument(
        "--restored-lease-secs",
        type=float,
        default=10.0,
        help="after a restart, how long each saved instance has to re-register",
    )
    p.add_argument(
        "--warmup-secs",
        type=float,
        default=3.0,
        help="after a restart with no saved registry, wait this long for services to re-register "
        "before configuring Envoy",
    )
    p.add_argument(
        "--strict-readiness",
        nargs="?",
        const="true",
        default="false",
        metavar="true|false",
        help="ServerReady only when every registered model version is READY (tritonserver's flag)",
    )
    p.add_argument(
        "--gateway-internal-grpc-port",
        type=int,
        default=0,
        help="a plaintext gRPC listener with the same routes, for the mesh's own callers when "
        "the public one serves TLS (0: none)",
    )
    add_tls_flags(p)
    p.add_argument(
        "--trace-config",
        action="append",
        default=[],
        metavar="[opentelemetry,]KEY=VALUE",
        help="tritonserver's tracing flag: the gateway traces to the same collector as the "
        "services (services/core/trace_config.py)",
    )
    a = p.parse_args(argv)
    try:
        strict = triton_bool("--strict-readiness", a.strict_readiness)
        traces = trace_config.parse([("--trace-config", value) for value in a.trace_config])
        # --trace-config or the standard OTEL_* variables turn the gateway's tracing on
        tracing = gateway_tracing(traces, os.environ)
        tls = tls_from_args(a)
    except ValueError as exc:
        p.error(str(exc))
    return ControlPlaneSettings(
        host=a.host,
        control_port=a.control_port,
        front_grpc_port=a.front_grpc_port,
        front_http_port=a.front_http_port,
        gateway_grpc_port=a.gateway_grpc_port,
        gateway_http_port=a.gateway_http_port,
        policy_file=a.policy_file,
        consul=a.consul,
        registry_file=a.registry_file,
        restored_lease_secs=a.restored_lease_secs,
        warmup_secs=a.warmup_secs,
        strict_readiness=strict,
        gateway_tracing=tracing,
        gateway_tls=tls,
        gateway_internal_grpc_port=a.gateway_internal_grpc_port,
    )


async def serve(settings: ControlPlaneSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    plane = ControlPlane(settings)
    await plane.start()
    try:
        await stop.wait()
    finally:
        await plane.stop()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(settings_from_args(argv)))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
