"""`meshserve up`: start the whole mesh on one machine and stop it cleanly.

Order: control plane (ADS + registry + front) ─▶ Envoy gateway (configured over ADS) ─▶ one
service per framework family found in the repository, each registering with the control plane.
Readiness: every family's service registered with no model still loading (the control plane's
status API, read through the gateway), each registered service answering SERVING on its own gRPC
health endpoint, and the gateway having ACKed the control plane's latest snapshot (so routes to
every model are in place). Stop: the services stop, callers first (ensemble, then python: the
later steps and BLS calls of their requests in flight still find their models), each
deregistering, serving until the gateway stopped sending to it, and draining; then the gateway,
then the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import sys
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from control_plane.gateway_tls import LOOPBACK, GatewayTls, tls_argv
from deploy.children import child_process_options
from deploy.families import families_in
from deploy.mesh_metrics import mesh_metrics_app
from gateway.launcher import Gateway
from protos.gen.health import health_pb2 as hpb
from protos.gen.health import health_pb2_grpc as hgrpc

log = logging.getLogger(__name__)


class MeshStartError(RuntimeError):
    """The mesh could not start: a service exited (e.g. --exit-on-error) or it was not ready in
    time. The message says which; the services' own logs say why."""


@dataclass(frozen=True, slots=True)
class MeshSettings:
    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    control_port: int = 8010
    #: the whole mesh's metrics (every service + Envoy); -1 = none
    metrics_port: int = 8002
    policy_file: Path | None = None
    model_control_mode: str = "none"
    #: in explicit mode, models each service loads at start ("*" = all)
    load_models: tuple[str, ...] = ()
    #: Envoy worker threads (0: one per core)
    gateway_workers: int = 0
    #: every service's --cache-config values (Triton's form, e.g. "local,size=1048576")
    cache_config: tuple[str, ...] = ()
    #: every service's --metrics-config values (e.g. "summary_latencies=true")
    metrics_config: tuple[str, ...] = ()
    #: False: every service runs with --disable-auto-complete-config
    auto_complete_config: bool = True
    #: tritonserver's flags each service gets as given (server_flags.MESH_FLAGS: logging,
    #: readiness, loading, backend config, rate limiting), e.g. "--log-verbose=1"
    service_flags: tuple[str, ...] = ()
    #: --strict-readiness: the gateway's ServerReady also needs every model READY
    strict_readiness: bool = False
    #: Triton's tracing flags as --trace-config values: Envoy traces to the same collector
    trace_config: tuple[str, ...] = ()
    #: Triton's --grpc-use-ssl flags: TLS on the gateway's gRPC port; the services' own calls
    #: through the gateway (BLS) then use the plaintext ``internal_grpc_port`` (loopback)
    gateway_tls: GatewayTls | None = None
    internal_grpc_port: int = 0
    python: str = sys.executable


def service_argv(s: MeshSettings, family: str) -> list[str]:
    """The command line of the mesh's service for ``family``: the mesh-wide service settings,
    free ports, registration with the control plane."""
    return [
        s.python,
        "-m",
        f"services.{family}",
        "--model-repository",
        str(s.repository),
        "--host",
        s.host,
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        "--model-control-mode",
        s.model_control_mode,
        "--control-plane",
        f"{s.host}:{s.control_port}",
        *(arg for name in s.load_models for arg in ("--load-model", name)),
        *(arg for value in s.cache_config for arg in ("--cache-config", value)),
        *(arg for value in s.metrics_config for arg in ("--metrics-config", value)),
        *([] if s.auto_complete_config else ["--disable-auto-complete-config"]),
        *s.service_flags,
    ]


def gateway_for_services(s: MeshSettings) -> str:
    """Where the services call the gateway (BLS): under TLS its plaintext twin on loopback."""
    port = s.internal_grpc_port
    return f"{LOOPBACK}:{port}" if port else f"{s.host}:{s.grpc_port}"


def registry_file(s: MeshSettings) -> Path | None:
    """Where the control plane saves its registry: beside the policy file (None without one)."""
    return s.policy_file.with_name("registry.json") if s.policy_file else None


def control_plane_command(s: MeshSettings, *, fresh: bool) -> list[str]:
    """The control plane's command line. ``fresh``: a new mesh, where no service exists yet, so
    Envoy is configured at once; otherwise (a restart) it starts from the saved registry."""
    policy = ["--policy-file", str(s.policy_file)] if s.policy_file else []
    saved = registry_file(s)
    registry = ["--registry-file", str(saved)] if saved else []
    warmup = ["--warmup-secs", "0"] if fresh else []
    return [
        s.python,
        "-m",
        "control_plane",
        "--host",
        s.host,
        "--control-port",
        str(s.control_port),
        "--gateway-grpc-port",
        str(s.grpc_port),
        "--gateway-http-port",
        str(s.http_port),
        *policy,
        *registry,
        *warmup,
        *(["--strict-readiness"] if s.strict_readiness else []),
        *(f"--trace-config={value}" for value in s.trace_config),
        *tls_argv(s.gateway_tls),
        *([f"--gateway-internal-grpc-port={s.internal_grpc_port}"] if s.internal_grpc_port else []),
    ]


class Mesh:
    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self.control: asyncio.subprocess.Process | None = None
        self.gateway: Gateway | None = None
        self.services: dict[str, asyncio.subprocess.Process] = {}
        self.metrics: web.AppRunner | None = None

    @property
    def status_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.http_port}/meshserve/v1/status"

    async def status(self) -> dict[str, Any] | None:
        """The control plane's status document through the gateway (None while unreachable)."""

        def fetch() -> dict[str, Any] | None:
            try:
                with urllib.request.urlopen(self.status_url, timeout=2) as r:
                    doc: dict[str, Any] = json.loads(r.read())
                    return doc
            except (OSError, ValueError):
                return None

        return await asyncio.to_thread(fetch)

    async def start(
        self, progress: Callable[[str], None] = log.info, ready_within_s: float = 180
    ) -> None:
        s = self.settings
        fams = families_in(s.repository)
        runnable = {
            f: m for f, m in fams.items() if importlib.util.find_spec(f"services.{f}") is not None
        }
        for fam in sorted(set(fams) - set(runnable)):
            progress(
                f"no service for framework family '{fam}' yet; not serving {', '.join(fams[fam])}"
            )
        saved = registry_file(s)
        if saved is not None:  # the services a previous mesh registered are gone
            saved.unlink(missing_ok=True)
        self.control = await asyncio.create_subprocess_exec(
            *control_plane_command(s, fresh=True), **child_process_options()
        )
        progress(f"control plane starting (ADS + registry on {s.host}:{s.control_port})")
        self.gateway = Gateway(
            s.host, s.control_port, workers=s.gateway_workers, spawn_options=child_process_options()
        )
        await self.gateway.start(timeout=30)
        progress(f"gateway ready: gRPC {s.host}:{s.grpc_port}, HTTP {s.host}:{s.http_port}")
        if s.metrics_port >= 0:
            gateway = self.gateway
            self.metrics = web.AppRunner(mesh_metrics_app(self.status, lambda: gateway.admin_url))
            await self.metrics.setup()
            await web.TCPSite(self.metrics, s.host, s.metrics_port, reuse_address=True).start()
            progress(f"metrics of the whole mesh on http://{s.host}:{s.metrics_port}/metrics")
        for fam in sorted(runnable):
            self.services[fam] = await asyncio.create_subprocess_exec(
                *service_argv(s, fam),
                # BLS calls from Python models go through the gateway (services/python/bls.py);
                # ensemble steps follow the gateway's routes read from the control plane's ADS
                # (services/core/mesh_caller.py)
                env={
                    **os.environ,
                    "MESHSERVE_GATEWAY": gateway_for_services(s),
                    "MESHSERVE_XDS": f"{s.host}:{s.control_port}",
                },
                **child_process_options(),
            )
            progress(f"service '{fam}' starting for {len(runnable[fam])} model(s)")
        await self._wait_ready(set(runnable), progress, ready_within_s)

    async def _wait_ready(
        self, families: set[str], progress: Callable[[str], None], within_s: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        last = ""
        while loop.time() < deadline:
            for fam, proc in self.services.items():
                if proc.returncode is not None:
                    raise MeshStartError(
                        f"service '{fam}' exited with {proc.returncode}; see its log above"
                    )
            doc = await self.status()
            if doc is not None:
                seen = {i["family"] for i in doc["instances"]}
                models = [m for i in doc["instances"] for m in i["models"]]
                ready = sum(m["state"] == "READY" for m in models)
                line = (
                    f"models ready: {ready}/{len(models)}; "
                    f"services registered: {len(seen)}/{len(families)}"
                )
                if line != last:
                    progress(line)
                    last = line
                if seen >= families and all(m["state"] != "LOADING" for m in models):
                    waiting_for = await _not_serving(doc)
                    if not waiting_for and not gateway_synced(doc):
                        waiting_for = "the gateway to accept the latest routes"
                    if not waiting_for:
                        return
                    if waiting_for != last:
                        progress(f"waiting for {waiting_for}")
                        last = waiting_for
            await asyncio.sleep(0.3)
        raise MeshStartError(f"the mesh did not become ready within {within_s:.0f} s")

    async def _reap(self, fam: str, within_s: float = 40) -> None:
        proc = self.services[fam]
        try:
            await asyncio.wait_for(proc.wait(), within_s)
        except TimeoutError:
            log.warning("service '%s' did not stop in time; killing it", fam)
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """Stop what was started without losing a request in flight: the services stop callers
        first (an ensemble's later steps and a Python model's BLS calls still find their models),
        then the gateway and the control plane. The gateway keeps its listeners open meanwhile:
        the callers' steps come in through them too (closing them sends every connection a
        GOAWAY, and a step's reconnect would be refused)."""
        for group in stop_order(self.services):
            for fam in group:
                if self.services[fam].returncode is None:
                    self.services[fam].send_signal(signal.SIGTERM)
            await asyncio.gather(*(self._reap(fam) for fam in group))
        if self.metrics is not None:
            await self.metrics.cleanup()
        if self.gateway is not None:
            await self.gateway.stop()
        if self.control is not None and self.control.returncode is None:
            self.control.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.control.wait(), 10)
            except TimeoutError:
                self.control.kill()
                with contextlib.suppress(ProcessLookupError):
                    await self.control.wait()


#: families whose models call other models through the gateway, stopped before the others (in
#: this order) so that what they have in flight still reaches its steps
CALLERS_FIRST = ("ensemble", "python")


def stop_order(families: Iterable[str]) -> list[list[str]]:
    """Groups of families to stop one after the other: each caller family alone, in
    ``CALLERS_FIRST`` order, then all the others together."""
    present = set(families)
    groups = [[f] for f in CALLERS_FIRST if f in present]
    rest = sorted(present - set(CALLERS_FIRST))
    return groups + ([rest] if rest else [])


def gateway_synced(doc: dict[str, Any]) -> bool:
    """Whether some gateway has ACKed the status document's snapshot for every resource type,
    and that snapshot already routes to the services registered."""
    version = doc.get("snapshot_version", "") if doc.get("routes_current", True) else ""
    gateways: dict[str, dict[str, dict[str, str]]] = doc.get("gateways", {})
    return bool(version) and any(
        types and all(t.get("acked_version", "").split("+")[0] == version for t in types.values())
        for types in gateways.values()
    )


async def _not_serving(doc: dict[str, Any]) -> str:
    """Ask each registered service's gRPC health endpoint (grpc.health.v1, server-wide); the
    first that is not SERVING, described, or "" when all are."""
    answers = await asyncio.gather(*(_health(i["address"]) for i in doc["instances"]))
    for instance, status in zip(doc["instances"], answers, strict=True):
        if status != "SERVING":
            return f"service '{instance['family']}' at {instance['address']} (health: {status})"
    return ""


async def _health(address: str) -> str:
    """The service's overall health status name, or why it could not be read."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = hgrpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = await stub.Check(hpb.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError as exc:
            return f"unreachable ({exc.code().name})"
    return str(hpb.HealthCheckResponse.ServingStatus.Name(reply.status))


async def run_until_signal(settings: MeshSettings) -> None:
    mesh = Mesh(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await mesh.start(progress=lambda line: print(f"meshserve: {line}", flush=True))
        print(
            f"meshserve: up. gRPC {settings.host}:{settings.grpc_port}, "
            f"HTTP {settings.host}:{settings.http_port} (Ctrl-C stops and drains)",
            flush=True,
        )
        await stop.wait()
        print("meshserve: draining and stopping", flush=True)
    finally:
        await mesh.stop()
