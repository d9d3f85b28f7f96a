"""`meshserve` — the command line: up, status, models, load, unload, split, mirror, infer.

Every command but ``up`` talks to a running mesh through its gateway's HTTP port (default
127.0.0.1:8000): the control plane's front answers /v2/repository/* and /meshserve/v1/*.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from control_plane.gateway_tls import LOOPBACK, add_tls_flags, tls_from_args
from deploy import infer
from deploy.supervisor import MeshSettings, MeshStartError, run_until_signal
from services.core.latency_metrics import parse_metrics_config
from services.core.response_cache import parse_cache_config
from services.core.server_flags import add_server_flags, given_argv, server_flags_from
from services.core.settings import add_auto_complete_flags, auto_complete_from
from services.core.trace_config import collector_problem


def _call(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        raise SystemExit(f"meshserve: {method} {url}: {exc.code}: {detail}") from None
    except OSError as exc:
        raise SystemExit(
            f"meshserve: cannot reach the mesh at {url}: {exc}; is `meshserve up` running?"
        ) from None
    return json.loads(text) if text else None


def _status(base: str) -> int:
    doc = _call(f"{base}/meshserve/v1/status")
    print(f"snapshot {doc['snapshot_version'] or '-'}")
    nodes = [("gateway", doc["gateways"]), ("caller", doc.get("callers", {}))]
    for kind, node, types in ((k, n, t) for k, of_kind in nodes for n, t in of_kind.items()):
        acked = ", ".join(
            f"{t}={st['acked_version'][:8] or '-'}" for t, st in sorted(types.items())
        )
        errors = [f"{t}: {st['error']}" for t, st in types.items() if st.get("error")]
        print(f"{kind} {node}: {acked}" + (f"  REJECTED {'; '.join(errors)}" if errors else ""))
    for inst in doc["instances"]:
        print(f"service {inst['id']} ({inst['family']}) at {inst['address']}")
        for m in inst["models"]:
            reason = f"  ({m['reason']})" if m.get("reason") else ""
            print(f"  {m['name']:24s} v{m['version'] or '-':4s} {m['state']}{reason}")
    for model, weights in doc["splits"].items():
        print(f"split {model}: " + " ".join(f"{v}={w}" for v, w in weights.items()))
    for model, mirror in doc.get("mirrors", {}).items():
        print(_mirror_line(model, mirror))
    return 0


def _models(base: str) -> int:
    for m in _call(f"{base}/v2/repository/index", "POST", {}):
        version = m.get("version", "") or "-"
        print(f"{m['name']:24s} {version:4s} {m.get('state', '')} {m.get('reason', '')}")
    return 0


def _split(base: str, model: str, weights: Sequence[str], clear: bool) -> int:
    if clear:
        _call(f"{base}/meshserve/v1/splits/{model}", "DELETE")
        print(
            f"split of {model} cleared: requests without a version go to the highest ready version"
        )
        return 0
    parsed: dict[str, int] = {}
    for item in weights:
        version, sep, weight = item.partition("=")
        if not sep or not weight.isdigit():
            raise SystemExit(f"meshserve: '{item}' is not VERSION=WEIGHT (e.g. 1=90 2=10)")
        parsed[version] = int(weight)
    doc = _call(f"{base}/meshserve/v1/splits/{model}", "PUT", {"weights": parsed})
    print(f"split {model}: " + " ".join(f"{v}={w}" for v, w in doc["weights"].items()))
    return 0


def _mirror_line(model: str, m: dict[str, Any]) -> str:
    state = "active" if m["active"] else f"inactive: {m['reason']}"
    return f"mirror {model}: {m['percent']:g}% to version {m['version']} ({state})"


def _mirror(base: str, model: str, version: str | None, percent: float, off: bool) -> int:
    if off == (version is not None):
        raise SystemExit("meshserve: give the shadow VERSION (e.g. `mirror simple 2`) or --off")
    if off:
        _call(f"{base}/meshserve/v1/mirrors/{model}", "DELETE")
        print(f"mirror of {model} off")
        return 0
    body = {"version": version, "percent": percent}
    print(_mirror_line(model, _call(f"{base}/meshserve/v1/mirrors/{model}", "PUT", body)))
    return 0


def up_settings(a: argparse.Namespace) -> MeshSettings:
    """MeshSettings from `meshserve up`'s arguments."""
    if not a.model_repository.is_dir():
        raise SystemExit(f"meshserve: model repository {a.model_repository} is not a folder")
    try:
        parse_cache_config(a.cache_config)
        parse_metrics_config(a.metrics_config)
        auto_complete = auto_complete_from(a)
        flags = server_flags_from(a)
        tls = tls_from_args(a)
    except ValueError as exc:
        raise SystemExit(f"meshserve: {exc}") from None
    problem = collector_problem(flags.trace, os.environ)
    if problem:
        raise SystemExit(f"meshserve: {problem}")
    return MeshSettings(
        repository=a.model_repository.resolve(),
        host=a.host,
        grpc_port=a.grpc_port,
        http_port=a.http_port,
        metrics_port=a.metrics_port,
        control_port=a.control_port,
        policy_file=a.policy_file.resolve(),
        model_control_mode=a.model_control_mode,
        gateway_workers=a.gateway_workers,
        load_models=tuple(a.load_model),
        cache_config=tuple(a.cache_config),
        metrics_config=tuple(a.metrics_config),
        auto_complete_config=auto_complete,
        service_flags=tuple(given_argv(a)),
        strict_readiness=flags.strict_readiness,
        trace_config=tuple(flags.trace.as_trace_config()),
        gateway_tls=tls,
        # the services' BLS calls cannot present the clients' certificates: a plaintext twin
        internal_grpc_port=_free_loopback_port() if tls is not None else 0,
    )


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshserve", description="Serve models as a mesh behind one gateway."
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's HTTP address")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up", help="start control plane, gateway and services; Ctrl-C drains and stops"
    )
    up.add_argument("--model-repository", type=Path, default=Path("examples/models"))
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--grpc-port", type=int, default=8001)
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--metrics-port", type=int, default=8002)
    up.add_argument("--control-port", type=int, default=8010)
    up.add_argument("--policy-file", type=Path, default=Path(".meshserve/policies.json"))
    up.add_argument("--model-control-mode", choices=("none", "poll", "explicit"), default="none")
    up.add_argument(
        "--gateway-workers", type=int, default=0, help="Envoy worker threads (0: one per core)"
    )
    up.add_argument(
        "--load-model", action="append", default=[], help="explicit mode: load at start (* = all)"
    )
    up.add_argument(
        "--cache-config",
        action="append",
        default=[],
        metavar="local,size=BYTES",
        help="a response cache in every service, for models with response_cache { enable: true }",
    )
    up.add_argument(
        "--metrics-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="every service's latency metrics (summary_latencies=true, histogram_latencies=true,"
        " ...)",
    )
    add_auto_complete_flags(up)
    add_server_flags(up, mesh=True)
    add_tls_flags(up.add_argument_group("TLS on the gateway's gRPC port (tritonserver's flags)"))
    sub.add_parser("status", help="services, their models, splits, mirrors, gateway config state")
    sub.add_parser("models", help="every model of the repository with its state")
    for name in ("load", "unload"):
        sub.add_parser(
            name, help=f"{name} a model on the service of its framework family"
        ).add_argument("model")
    split = sub.add_parser(
        "split", help="weights over a model's versions, e.g. `split simple 1=90 2=10`"
    )
    split.add_argument("model")
    split.add_argument("weights", nargs="*")
    split.add_argument("--clear", action="store_true")
    about = (
        "copy a share of a model's inference requests that name no version to a shadow version "
        "(its answers are discarded; requests naming a version are not mirrored), "
        "e.g. `mirror simple 2 --percent 10`"
    )
    mirror = sub.add_parser("mirror", help=about, description=about)
    mirror.add_argument("model")
    mirror.add_argument("version", nargs="?", help="the shadow version")
    mirror.add_argument("--percent", type=float, default=100.0, help="0 < p <= 100 (default 100)")
    mirror.add_argument("--off", action="store_true", help="stop mirroring the model")
    about = (
        "one inference through the gateway (REST): inputs from --input NAME=JSON, the others "
        "random; prints each output"
    )
    run = sub.add_parser("infer", help=about, description=about)
    run.add_argument("model")
    run.add_argument("--version", default="", help="a version (default: the model's policy)")
    run.add_argument(
        "--input", action="append", default=[], help="NAME=VALUES, JSON, e.g. INPUT0=[1,2,3]"
    )
    run.add_argument("--shape", action="append", default=[], help="NAME=DIMS, e.g. INPUT0=1,16")
    run.add_argument("--batch", type=int, default=1, help="batch size of a batching model")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    run.add_argument("--json", action="store_true", help="print the raw JSON response")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    base = a.url.rstrip("/")
    if a.command == "up":
        try:
            asyncio.run(run_until_signal(up_settings(a)))
        except MeshStartError as exc:
            print(f"meshserve: {exc}", file=sys.stderr)
            return 1
        return 0
    if a.command == "status":
        return _status(base)
    if a.command == "models":
        return _models(base)
    if a.command in ("load", "unload"):
        _call(f"{base}/v2/repository/models/{a.model}/{a.command}", "POST", {})
        print(f"{a.command}ed {a.model}")
        return 0
    if a.command == "mirror":
        return _mirror(base, a.model, a.version, a.percent, a.off)
    if a.command == "infer":
        return infer.run(_call, base, a.model, a.version, a.input, a.shape, a.batch, a.seed, a.json)
    return _split(base, a.model, a.weights, a.clear)


if __name__ == "__main__":
    sys.exit(main())
