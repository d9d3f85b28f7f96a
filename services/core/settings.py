"""Typed settings of one framework service, built once in its __main__ from the command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from services.core.busy_poll import ENV as BUSY_POLL_ENV
from services.core.latency_metrics import MetricsConfig, parse_metrics_config
from services.core.response_cache import parse_cache_config
from services.core.server_flags import ServerFlags, add_server_flags, server_flags_from, triton_bool

ControlMode = Literal["none", "poll", "explicit"]
#: who owns the gRPC port: grpc_front (C++, native_front.py), grpc.aio, or the front where built
GrpcFrontend = Literal["auto", "native", "aio"]

#: tritonclient allows messages up to INT32_MAX; grpcio's server default is 4 MiB.
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1


#: ServerMetadata's name unless --id gives another
DEFAULT_SERVER_NAME = "meshserve"

#: busy-poll window when neither --busy-poll-us nor MESHSERVE_BUSY_POLL_US says (busy_poll.py)
DEFAULT_BUSY_POLL_US = 500


def default_busy_poll_us() -> int:
    """MESHSERVE_BUSY_POLL_US when set, else DEFAULT_BUSY_POLL_US."""
    text = os.environ.get(BUSY_POLL_ENV, "").strip()
    if not text:
        return DEFAULT_BUSY_POLL_US
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"{BUSY_POLL_ENV}={text!r}: give the busy-poll window in whole microseconds (0 = off)"
        )
    return value


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything a service needs to start; defaults match Triton's."""

    #: root of a Triton-layout model repository
    model_repository: Path
    #: address the gRPC, HTTP and metrics listeners bind (loopback unless told otherwise)
    host: str = "127.0.0.1"
    #: gRPC port (0 = pick a free one)
    grpc_port: int = 8001
    #: HTTP/REST port (0 = pick a free one, -1 = no HTTP endpoint)
    http_port: int = 8000
    #: Prometheus metrics port (0 = pick a free one, -1 = no metrics endpoint)
    metrics_port: int = 8002
    #: Triton's model control mode: none (load all at start), poll (follow the repository), explicit
    model_control_mode: ControlMode = "none"
    #: models loaded at start in explicit mode ("*" = all)
    startup_models: tuple[str, ...] = ()
    #: seconds between repository scans in poll mode
    repository_poll_secs: float = 15.0
    #: largest gRPC message accepted or sent, in bytes
    max_message_bytes: int = MAX_GRPC_MESSAGE_BYTES
    #: seconds in-flight requests get to finish on shutdown
    exit_timeout_secs: float = 30.0
    #: on shutdown in a mesh: after deregistering, keep serving until no request arrived for
    #: this long (the gateway stopped routing here), at most ``exit_timeout_secs``
    leave_quiet_secs: float = 0.3
    #: ServerMetadata name
    server_name: str = DEFAULT_SERVER_NAME
    #: log level name for the service's loggers
    log_level: str = "INFO"
    #: IP address the mesh reaches this service at ("" = the bound host; a wildcard bind: this
    #: machine's host name resolved)
    advertise_host: str = ""
    #: host:port of the control plane's embedded registry to register with ("" = standalone)
    control_plane: str = ""
    #: host:port of the local Consul agent to register with instead ("" = no Consul)
    consul: str = ""
    #: framework family this service reports (onnx, torch, ...); set by each service's __main__
    family: str = ""
    #: lease asked of the embedded registry, in seconds (heartbeats every third of it)
    registration_ttl_secs: float = 3.0
    #: gRPC transport: "native" (grpc_front, built by ``make native``), "aio" (grpc.aio in this
    #: process), "auto" (native where built, else aio)
    grpc_frontend: GrpcFrontend = "auto"
    #: microseconds the event loop run_service makes keeps polling for work before it sleeps
    #: (busy_poll.py; 0 = never: the loop sleeps as soon as it is idle)
    busy_poll_us: int = field(default_factory=default_busy_poll_us)
    #: size of the response cache shared by the models that enable ``response_cache`` (bytes;
    #: 0 = no cache, as Triton without --cache-config)
    response_cache_bytes: int = 0
    #: which latency metrics the metrics endpoint exports (counters, summaries, histograms)
    metrics_config: MetricsConfig = field(default_factory=MetricsConfig)
    #: complete a model's config from its model file (False: Triton's
    #: --disable-auto-complete-config; configs must be whole)
    auto_complete_config: bool = True
    #: Triton's --rate-limit: "off" (instances run as soon as they are free) or
    #: "execution_count" (an instance runs only once its instance_group's rate_limiter
    #: resources are free; rate_limiter.py)
    rate_limit: Literal["off", "execution_count"] = "off"
    #: --rate-limit-resource values as (name, count, device); device -1 = every device. A
    #: resource not listed is available as the most any one instance asks for
    rate_limit_resources: tuple[tuple[str, int, int], ...] = ()
    #: tritonserver's other flags (server_flags.py: logging, readiness, loading, backend config,
    #: listener addresses); the rate limit fields above are copied from there
    flags: ServerFlags = field(default_factory=ServerFlags)


def add_auto_complete_flags(p: argparse.ArgumentParser) -> None:
    """Triton's two spellings of "configs must be whole": --disable-auto-complete-config and the
    older --strict-model-config[=true|false]."""
    p.add_argument(
        "--disable-auto-complete-config",
        action="store_true",
        help="do not complete model configs from model files: each config.pbtxt must list its "
        "inputs, outputs and max_batch_size (as tritonserver's flag)",
    )
    p.add_argument(
        "--strict-model-config",
        nargs="?",
        const="true",
        default=None,
        metavar="true|false",
        help="tritonserver's older flag: true = --disable-auto-complete-config (default false)",
    )


def auto_complete_from(a: argparse.Namespace) -> bool:
    """Whether configs are auto-completed, from add_auto_complete_flags' flags; ValueError on a
    value that is not a boolean or flags that disagree."""
    disabled: bool = a.disable_auto_complete_config
    if a.strict_model_config is not None:
        strict = triton_bool("--strict-model-config", a.strict_model_config)
        if disabled and not strict:
            raise ValueError(
                "--disable-auto-complete-config and --strict-model-config=false disagree"
            )
        disabled = strict
    return not disabled


def settings_from_args(argv: Sequence[str] | None, prog: str, family: str = "") -> ServerSettings:
    """Parse a service's command line into settings (flag names follow tritonserver's)."""
    p = argparse.ArgumentParser(prog=prog, description="Serve a Triton-layout model repository.")
    p.add_argument(
        "--model-repository",
        "--model-store",
        required=True,
        type=Path,
        action="append",
        help="the Triton-layout model repository (one per service)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-control-mode", choices=("none", "poll", "explicit"), default="none")
    p.add_argument("--load-model", action="append", default=[], dest="startup_models")
    p.add_argument("--repository-poll-secs", type=float, default=15.0)
    p.add_argument("--exit-timeout-secs", type=float, default=30.0)
    p.add_argument(
        "--leave-quiet-secs",
        type=float,
        default=0.3,
        help="on shutdown in a mesh, after deregistering keep serving until no request arrived "
        "for this long (the gateway stopped routing here); 0 = stop right away",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--advertise-host",
        default="",
        help="IP address the mesh reaches this service at (default: --host; with a wildcard "
        "--host, this machine's host name resolved)",
    )
    p.add_argument("--control-plane", default="", help="host:port of the mesh registry")
    p.add_argument("--consul", default="", help="host:port of the local Consul agent")
    p.add_argument("--registration-ttl-secs", type=float, default=3.0)
    p.add_argument(
        "--grpc-frontend",
        choices=("auto", "native", "aio"),
        default="auto",
        help="who serves the gRPC port: native = the C++ grpc_front (make native), aio = "
        "grpc.aio in this process, auto = native where it is built (default)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=int,
        default=None,
        help="microseconds the event loop keeps polling for work before it sleeps: lower latency"
        " at low load for CPU (0 = off; default: $MESHSERVE_BUSY_POLL_US, else"
        f" {DEFAULT_BUSY_POLL_US})",
    )
    p.add_argument(
        "--cache-config",
        action="append",
        default=[],
        metavar="local,size=BYTES",
        help="the response cache for models with response_cache { enable: true } (Triton's flag;"
        " default: no cache)",
    )
    p.add_argument(
        "--response-cache-byte-size",
        type=int,
        default=None,
        help="the same as --cache-config local,size=BYTES (Triton's older flag)",
    )
    p.add_argument(
        "--metrics-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="latency metrics, as tritonserver's: counter_latencies=true|false,"
        " summary_latencies=true|false, summary_quantiles=0.5:0.05,...,"
        " histogram_latencies=true|false",
    )
    add_auto_complete_flags(p)
    add_server_flags(p)
    a = p.parse_args(argv)
    if len(a.model_repository) > 1:
        p.error("give one --model-repository: a service serves one repository")
    try:
        metrics_config = parse_metrics_config(a.metrics_config)
        auto_complete = auto_complete_from(a)
        flags = server_flags_from(a)
    except ValueError as exc:
        p.error(str(exc))
    try:
        cache_bytes = parse_cache_config(a.cache_config)
    except ValueError as exc:
        p.error(str(exc))
    if a.response_cache_byte_size is not None:
        if a.cache_config:
            p.error("give the cache size once: --cache-config or --response-cache-byte-size")
        if a.response_cache_byte_size < 0:
            p.error("--response-cache-byte-size must be a whole number of bytes (0 = off)")
        cache_bytes = a.response_cache_byte_size
    if a.busy_poll_us is None:
        try:
            a.busy_poll_us = default_busy_poll_us()
        except ValueError as exc:
            p.error(str(exc))
    elif a.busy_poll_us < 0:
        p.error("--busy-poll-us must be 0 (off) or a positive number of microseconds")
    if a.control_plane and a.consul:
        p.error("register with one registry: give --control-plane or --consul, not both")
    return ServerSettings(
        model_repository=a.model_repository[0],
        host=a.host,
        grpc_port=a.grpc_port,
        http_port=a.http_port if flags.allow_http else -1,
        metrics_port=a.metrics_port if flags.allow_metrics else -1,
        model_control_mode=a.model_control_mode,
        startup_models=tuple(a.startup_models),
        repository_poll_secs=a.repository_poll_secs,
        exit_timeout_secs=a.exit_timeout_secs,
        leave_quiet_secs=a.leave_quiet_secs,
        log_level=a.log_level.upper(),
        advertise_host=a.advertise_host,
        control_plane=a.control_plane,
        consul=a.consul,
        family=family,
        registration_ttl_secs=a.registration_ttl_secs,
        grpc_frontend=a.grpc_frontend,
        busy_poll_us=a.busy_poll_us,
        response_cache_bytes=cache_bytes,
        metrics_config=metrics_config,
        auto_complete_config=auto_complete,
        rate_limit=flags.rate_limit,
        rate_limit_resources=flags.rate_limit_resources,
        flags=flags,
        server_name=flags.server_id or DEFAULT_SERVER_NAME,
    )
