"""tritonserver's other start-up flags, so that a Triton launch script starts a service unchanged.

settings.py owns the repository, ports, model control, cache and metrics flags; this module the
rest of tritonserver's command line, in three kinds:

- **honoured**: logging (``--log-verbose``, ``--log-info``, ``--log-warning``, ``--log-error``,
  ``--log-format``, ``--log-file``), ``--id``, ``--strict-readiness``, ``--exit-on-error``,
  ``--model-load-thread-count``, ``--model-load-retry-count``, ``--backend-config`` (the global
  ``default-max-batch-size``; other keys are logged as unused), ``--allow-http``,
  ``--allow-metrics``, ``--grpc-address`` / ``--http-address`` / ``--metrics-address``,
  ``--rate-limit`` and ``--rate-limit-resource``, and the tracing flags (``--trace-config``, the
  older ``--trace-*``), which ``trace_config`` reads;
- **no effect here** (``NO_EFFECT``): tuning of things meshserve does not have (pinned and CUDA
  memory pools, backend and repository-agent folders, thread counts of Triton's own servers,
  gRPC keepalive, which the gateway's listeners own). Accepted; each is logged once at start
  with the reason;
- **refused** (``REFUSED``): flags whose absence would change what a client sees or weaken
  security (TLS, restricted APIs, header forwarding, SageMaker / Vertex AI endpoints, model
  namespacing, port sharing): the service stops at start with the reason, rather than serve
  something the script did not ask for. Their "off" values (``--grpc-use-ssl=false``) are fine.

Booleans take Triton's spellings (true/on/1, false/off/0, any case); a bare flag means true.
``meshserve up`` registers the mesh-wide ones (``add_server_flags(p, mesh=True)``), checks them
and hands each service the flags as given (``given_flags``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from services.core import trace_config
from services.core.flag_values import whole_number

#: Triton's ``--backend-config`` key every backend reads (auto-complete's max_batch_size)
DEFAULT_MAX_BATCH_SIZE_KEY = "default-max-batch-size"
#: where argparse keeps the flags of this module as given, in order (given_flags)
_GIVEN = "server_flags_given"

_TRUE = frozenset({"true", "on", "1"})
_FALSE = frozenset({"false", "off", "0"})


def triton_bool(flag: str, text: str) -> bool:
    """A tritonserver boolean option's value; ValueError naming the flag otherwise."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{flag}={text}: give true or false (also on/off, 1/0)")


#: flags accepted and ignored, with why (logged once at start)
NO_EFFECT: dict[str, str] = {
    "--pinned-memory-pool-byte-size": "there is no pinned host memory pool: each framework "
    "copies inputs to its device itself",
    "--cuda-memory-pool-byte-size": "each framework allocates its own device memory",
    "--cuda-virtual-address-size": "each framework allocates its own device memory",
    "--min-supported-compute-capability": "each framework decides which GPUs it can use",
    "--backend-directory": "framework families are Python packages (services/<family>), not "
    "backend libraries",
    "--repoagent-directory": "repository agents are not supported",
    "--buffer-manager-thread-count": "inputs are not gathered by a thread pool here",
    "--http-thread-count": "HTTP is served by the service's event loop",
    "--grpc-infer-allocation-pool-size": "gRPC messages are not pooled here",
    "--metrics-interval-ms": "metrics are read when they are scraped",
    "--allow-gpu-metrics": "no GPU metrics are exported",
    "--cache-directory": "the local response cache is built in",
    "--host-policy": "no NUMA host policies",
    "--model-load-gpu-limit": "loading is not limited by GPU memory",
    "--grpc-keepalive-time": "gRPC keepalive is set on the gateway's listeners",
    "--grpc-keepalive-timeout": "gRPC keepalive is set on the gateway's listeners",
    "--grpc-keepalive-permit-without-calls": "gRPC keepalive is set on the gateway's listeners",
    "--grpc-http2-max-pings-without-data": "gRPC keepalive is set on the gateway's listeners",
    "--grpc-http2-min-recv-ping-interval-without-data": "gRPC keepalive is set on the "
    "gateway's listeners",
    "--grpc-http2-max-ping-strikes": "gRPC keepalive is set on the gateway's listeners",
    "--grpc-max-connection-age": "connection ages are set on the gateway's listeners",
    "--grpc-max-connection-age-grace": "connection ages are set on the gateway's listeners",
    "--grpc-infer-response-compression-level": "responses are compressed only when the client "
    "asks (grpc-accept-encoding)",
}

#: flags refused unless their value turns them off (None: refused whatever the value), with why
_TLS = (
    "TLS is terminated at the gateway (Envoy), not in a service: give the TLS flags to "
    "`meshserve up`"
)
#: Triton's gRPC TLS flags: refused by a service, taken by ``meshserve up`` for the gateway
#: (control_plane/gateway_tls.py), in this order
GATEWAY_TLS_FLAGS = (
    "--grpc-use-ssl",
    "--grpc-use-ssl-mutual",
    "--grpc-server-cert",
    "--grpc-server-key",
    "--grpc-root-cert",
)
_RESTRICT = (
    "meshserve does not restrict APIs by header; keep those APIs off the network at the gateway"
)
_FORWARD = "meshserve does not forward headers as request parameters"
_REUSE = "services do not share ports; run replicas behind the gateway"
REFUSED: dict[str, tuple[frozenset[str] | None, str]] = {
    "--grpc-use-ssl": (_FALSE, _TLS),
    "--grpc-use-ssl-mutual": (_FALSE, _TLS),
    "--grpc-server-cert": (None, _TLS),
    "--grpc-server-key": (None, _TLS),
    "--grpc-root-cert": (None, _TLS),
    "--http-restricted-api": (None, _RESTRICT),
    "--grpc-restricted-protocol": (None, _RESTRICT),
    "--http-header-forward-pattern": (None, _FORWARD),
    "--grpc-header-forward-pattern": (None, _FORWARD),
    "--allow-sagemaker": (_FALSE, "there is no SageMaker endpoint"),
    "--allow-vertex-ai": (_FALSE, "there is no Vertex AI endpoint"),
    "--model-namespacing": (_FALSE, "a model name is one folder of the service's one repository"),
    "--reuse-grpc-port": (_FALSE, _REUSE),
    "--reuse-http-port": (_FALSE, _REUSE),
    "--allow-grpc": (_TRUE, "the mesh reaches every service over gRPC, and health checks too"),
}

#: flags ``meshserve up`` takes and passes to every service (the others are per service)
MESH_FLAGS = (
    "--allow-cpu-metrics",
    "--log-verbose",
    "--log-info",
    "--log-warning",
    "--log-error",
    "--log-format",
    "--log-file",
    "--strict-readiness",
    "--exit-on-error",
    "--model-load-thread-count",
    "--model-load-retry-count",
    "--backend-config",
    "--rate-limit",
    "--rate-limit-resource",
    *trace_config.FLAGS,
    *NO_EFFECT,
    *(flag for flag in REFUSED if flag not in GATEWAY_TLS_FLAGS),
)


class _Given(argparse.Action):
    """Stores the value as argparse would and also records (flag, value) in order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        flag = self.option_strings[0]
        value = "true" if values is None else str(values)
        given: list[tuple[str, str]] = getattr(namespace, _GIVEN, None) or []
        given.append((flag, value))
        setattr(namespace, _GIVEN, given)
        if self.default == []:
            setattr(namespace, self.dest, [*getattr(namespace, self.dest), value])
        else:
            setattr(namespace, self.dest, value)


def _flag(p: argparse._ActionsContainer, flag: str, *, boolean: bool = False, **kw: Any) -> None:
    if boolean:
        kw.setdefault("metavar", "true|false")
        kw.update(nargs="?", const=None)
    p.add_argument(flag, action=_Given, **kw)


def add_server_flags(p: argparse.ArgumentParser, *, mesh: bool = False) -> None:
    """Register this module's flags; ``mesh``: only those ``meshserve up`` passes to services."""
    group = p.add_argument_group("tritonserver flags (see services/core/server_flags.py)")
    _flag(group, "--log-verbose", metavar="N", help="verbose logging level (0 = off)")
    for level in ("info", "warning", "error"):
        _flag(group, f"--log-{level}", boolean=True, help=f"{level}-level logging (default on)")
    _flag(group, "--log-format", metavar="default|ISO8601", help="log line format")
    _flag(group, "--log-file", metavar="PATH", help="append logs to this file, not stderr")
    _flag(
        group,
        "--strict-readiness",
        boolean=True,
        help="ServerReady only when every model is ready (default false here: a model that "
        "fails to load does not take the others out of service)",
    )
    _flag(
        group,
        "--exit-on-error",
        boolean=True,
        help="stop at start if a model fails to load (default false here)",
    )
    _flag(group, "--allow-cpu-metrics", boolean=True, help="export nv_cpu_* metrics (default true)")
    _flag(group, "--model-load-thread-count", metavar="N", help="models loaded at once (4)")
    _flag(group, "--model-load-retry-count", metavar="N", help="retries of a failed load (0)")
    _flag(
        group,
        "--backend-config",
        metavar="[BACKEND,]KEY=VALUE",
        default=[],
        help="e.g. default-max-batch-size=8 (the max_batch_size auto-complete gives)",
    )
    _flag(group, "--rate-limit", metavar="off|execution_count", help="rate limiter mode")
    _flag(
        group,
        "--rate-limit-resource",
        metavar="NAME:COUNT[:DEVICE]",
        default=[],
        help="how many of a rate_limiter resource exist",
    )
    _flag(
        group,
        "--trace-config",
        metavar="[opentelemetry,]KEY=VALUE",
        default=[],
        help="e.g. mode=opentelemetry, opentelemetry,url=HOST:4318/v1/traces, level=TIMESTAMPS, "
        "rate=N (see services/core/trace_config.py)",
    )
    _flag(group, "--trace-level", metavar="OFF|TIMESTAMPS", default=[], help=argparse.SUPPRESS)
    for flag in ("--trace-rate", "--trace-count", "--trace-file", "--trace-log-frequency"):
        _flag(group, flag, help=argparse.SUPPRESS)
    if not mesh:
        _flag(group, "--id", metavar="NAME", help="the server name ServerMetadata reports")
        _flag(group, "--allow-http", boolean=True, help="serve HTTP/REST (default true)")
        _flag(group, "--allow-metrics", boolean=True, help="serve metrics (default true)")
        for listener in ("grpc", "http", "metrics"):
            _flag(
                group,
                f"--{listener}-address",
                metavar="ADDRESS",
                help=f"bind the {listener} listener here (default: --host)",
            )
    quiet = argparse.SUPPRESS
    for flag in (*NO_EFFECT, *REFUSED):
        if not (mesh and flag in GATEWAY_TLS_FLAGS):  # `meshserve up`'s own (gateway_tls.py)
            _flag(group, flag, help=quiet, nargs="?")


def given_flags(a: argparse.Namespace) -> list[tuple[str, str]]:
    """This module's flags as given on the command line, in order: (flag, value)."""
    return list(getattr(a, _GIVEN, None) or [])


def given_argv(a: argparse.Namespace) -> list[str]:
    """The mesh-wide flags as given, as arguments for a service's command line."""
    return [f"{flag}={value}" for flag, value in given_flags(a) if flag in MESH_FLAGS]


LogValue = str | int | bool
#: the honoured true/false flags (their ServerFlags field is the name without dashes)
_BOOLEANS = (
    "--strict-readiness",
    "--exit-on-error",
    "--allow-http",
    "--allow-metrics",
    "--allow-cpu-metrics",
)


@dataclass(frozen=True, slots=True)
class ServerFlags:
    """What this module's flags set (defaults: none given)."""

    #: LogSettings to start with, by Triton's keys (log_settings.py)
    log_settings: tuple[tuple[str, LogValue], ...] = ()
    server_id: str = ""
    strict_readiness: bool = False
    exit_on_error: bool = False
    model_load_thread_count: int = 4
    model_load_retry_count: int = 0
    #: --backend-config values as (backend, key, value); backend "" = every backend
    backend_config: tuple[tuple[str, str, str], ...] = ()
    allow_http: bool = True
    allow_metrics: bool = True
    #: Triton's nv_cpu_* host metrics (services/core/host_metrics.py)
    allow_cpu_metrics: bool = True
    grpc_address: str = ""
    http_address: str = ""
    metrics_address: str = ""
    rate_limit: Literal["off", "execution_count"] = "off"
    rate_limit_resources: tuple[tuple[str, int, int], ...] = ()
    #: Triton's tracing flags (services/core/trace_config.py)
    trace: trace_config.TraceFlags = field(default_factory=trace_config.TraceFlags)
    #: flags given that have no effect here, with why (logged at start)
    no_effect: tuple[tuple[str, str], ...] = ()

    def default_max_batch_size(self, backend: str) -> int:
        """The max_batch_size auto-complete gives a model of ``backend`` that can batch: the
        backend's own ``default-max-batch-size``, else the global one, else Triton's 4."""
        found = {b: v for b, k, v in self.backend_config if k == DEFAULT_MAX_BATCH_SIZE_KEY}
        return int(found.get(backend, found.get("", "4")))

    def unused_backend_config(self, backends: Sequence[str]) -> list[str]:
        """``--backend-config`` values for ``backends`` (or every backend) that nothing here
        reads, as given."""
        return [
            f"{b + ',' if b else ''}{k}={v}"
            for b, k, v in self.backend_config
            if k != DEFAULT_MAX_BATCH_SIZE_KEY and (not b or b in backends)
        ]


def _log_verbose(text: str) -> int:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return int(lowered == "true")
    return whole_number("--log-verbose", text, 0)


def parse_backend_config(text: str) -> tuple[str, str, str]:
    """``[backend,]key=value`` as (backend, key, value); backend "" = every backend."""
    head, setting = ("", text)
    if "," in text.split("=", 1)[0]:
        head, _, setting = text.partition(",")
    key, eq, value = setting.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"--backend-config={text}: give <backend>,<key>=<value> or <key>=<value>")
    return head.strip(), key.strip(), value.strip()


def parse_rate_limit_resource(text: str) -> tuple[str, int, int]:
    """``name:count[:device]`` as (name, count, device); device -1 = every device."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].strip():
        raise ValueError(f"--rate-limit-resource={text}: give <name>:<count>[:<device>]")
    count = whole_number("--rate-limit-resource count", parts[1], 0)
    device = whole_number("--rate-limit-resource device", parts[2], 0) if len(parts) == 3 else -1
    return parts[0].strip(), count, device


def server_flags_from(a: argparse.Namespace) -> ServerFlags:
    """The settings of the flags given; ValueError naming the flag for a bad or refused one."""
    fields: dict[str, Any] = {}
    log: dict[str, LogValue] = {}
    backend: list[tuple[str, str, str]] = []
    resources: list[tuple[str, int, int]] = []
    no_effect: list[tuple[str, str]] = []
    traces: list[tuple[str, str]] = []
    for flag, value in given_flags(a):
        name = flag[2:].replace("-", "_")
        if flag in REFUSED:
            allowed, why = REFUSED[flag]
            if allowed is None or value.strip().lower() not in allowed:
                raise ValueError(f"{flag}={value} is not supported: {why}")
        elif flag in NO_EFFECT:
            no_effect.append((flag, NO_EFFECT[flag]))
        elif flag == "--log-verbose":
            log["log_verbose_level"] = _log_verbose(value)
        elif flag in ("--log-info", "--log-warning", "--log-error"):
            log[name] = triton_bool(flag, value)
        elif flag == "--log-format":
            if value not in ("default", "ISO8601"):
                raise ValueError(f"--log-format={value}: give default or ISO8601")
            log["log_format"] = value
        elif flag == "--log-file":
            log["log_file"] = value
        elif flag in _BOOLEANS:
            fields[name] = triton_bool(flag, value)
        elif flag in ("--model-load-thread-count", "--model-load-retry-count"):
            fields[name] = whole_number(flag, value, 1 if "thread" in flag else 0)
        elif flag == "--backend-config":
            entry = parse_backend_config(value)
            if entry[1] == DEFAULT_MAX_BATCH_SIZE_KEY:
                whole_number(f"--backend-config {DEFAULT_MAX_BATCH_SIZE_KEY}", entry[2], 0)
            backend.append(entry)
        elif flag == "--rate-limit":
            mode = value.strip().lower()
            if mode not in ("off", "execution_count"):
                raise ValueError(f"--rate-limit={value}: give off or execution_count")
            fields["rate_limit"] = mode
        elif flag == "--rate-limit-resource":
            resources.append(parse_rate_limit_resource(value))
        elif flag in trace_config.FLAGS:
            traces.append((flag, value))
        elif flag == "--id":
            fields["server_id"] = value
        else:  # the listener addresses
            fields[name] = value
    if resources and fields.get("rate_limit") != "execution_count":
        raise ValueError("--rate-limit-resource needs --rate-limit=execution_count")
    return ServerFlags(
        log_settings=tuple(log.items()),
        backend_config=tuple(backend),
        rate_limit_resources=tuple(resources),
        trace=trace_config.parse(traces),
        no_effect=tuple(no_effect),
        **fields,
    )
