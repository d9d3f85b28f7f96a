"""The control plane process: registry ─▶ MeshState ─▶ translate ─▶ snapshot ─▶ ADS, plus the front.

One gRPC server on the control port carries ADS (for Envoy) and the embedded registry (for the
services); the front listens on its own gRPC and HTTP ports, which the gateway routes to. Every
registry or policy change produces a new MeshState; an inconsistent snapshot is refused (logged)
and Envoy keeps the last good one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import grpc
from aiohttp import web
from envoy.service.discovery.v3 import ads_pb2_grpc

from control_plane import shared_regions, shared_settings
from control_plane.admin import add_admin_routes
from control_plane.ads import AdsServicer
from control_plane.consul import ConsulSource
from control_plane.front import add_front_to_server
from control_plane.front_core import Front
from control_plane.front_http import build_front_app
from control_plane.gateway_secrets import RELOAD_SECS, CertificateWatch
from control_plane.gateway_tls import GatewayTls
from control_plane.model import Address, MeshState, ServiceInstance
from control_plane.policy import PolicyStore
from control_plane.registry import Registry, RegistryServicer
from control_plane.registry_file import load_instances, save_instances
from control_plane.snapshot import InconsistentSnapshot, SnapshotCache, make_snapshot
from control_plane.tracing import GatewayTracing, percent_from_trace_settings
from control_plane.translate import translate
from protos.gen.meshserve import registry_pb2_grpc

log = logging.getLogger(__name__)


class Source(Protocol):
    """What the control plane reads from a registry backend (embedded or Consul)."""

    @property
    def version(self) -> int: ...

    def instances(self) -> tuple[ServiceInstance, ...]: ...

    async def wait_changed(self, since_version: int) -> int: ...

    def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ControlPlaneSettings:
    #: address every listener of the control plane and the gateway binds (loopback by default)
    host: str = "127.0.0.1"
    #: ADS + embedded registry (gRPC); services point --control-plane here
    control_port: int = 8010
    #: the front's own ports (the gateway routes server-level and unknown-model calls there)
    front_grpc_port: int = 0
    front_http_port: int = 0
    #: the ports the gateway's listeners take (clients use these)
    gateway_grpc_port: int = 8001
    gateway_http_port: int = 8000
    #: where traffic policies persist (None: memory only)
    policy_file: Path | None = None
    #: Consul agent address; empty = the embedded registry
    consul: str = ""
    #: where the embedded registry saves its instances (None: memory only). A restart that
    #: finds the file configures Envoy at once from it (the config Envoy already runs); each
    #: restored instance has ``restored_lease_secs`` to re-register before it is dropped.
    registry_file: Path | None = None
    restored_lease_secs: float = 10.0
    #: after a (re)start with no saved registry, wait this long before the first snapshot, so
    #: services re-register first: an Envoy that reconnects keeps its last config until then
    #: instead of taking an empty one. 0 = publish at once (a fresh `meshserve up`, where no
    #: service exists yet).
    warmup_secs: float = 3.0
    #: the gateway's OpenTelemetry tracing (from OTEL_EXPORTER_OTLP_ENDPOINT); None = off
    gateway_tracing: GatewayTracing | None = None
    #: tritonserver's --strict-readiness: the gateway's ServerReady also needs every model
    #: version the services registered READY (one unloaded on request does not count)
    strict_readiness: bool = False
    #: tritonserver's --grpc-use-ssl flags: TLS on the gateway's gRPC listener; None = plaintext
    gateway_tls: GatewayTls | None = None
    #: a plaintext gRPC listener with the same routes, for the mesh's own callers (0 = none)
    gateway_internal_grpc_port: int = 0
    #: how often the TLS files are read again (a rotated certificate is served from then on)
    tls_reload_secs: float = RELOAD_SECS


class ControlPlane:
    def __init__(self, settings: ControlPlaneSettings) -> None:
        self.settings = settings
        self.registry: Registry | None = None if settings.consul else Registry()
        self.source: Source = (
            self.registry if self.registry is not None else ConsulSource(settings.consul)
        )
        self.policies = PolicyStore(settings.policy_file)
        self.cache = SnapshotCache()
        #: the gateway's TLS certificate, re-read while serving (ValueError if it does not check)
        self.certificates = (
            CertificateWatch(settings.gateway_tls, settings.tls_reload_secs)
            if settings.gateway_tls is not None
            else None
        )
        self.ads = AdsServicer(self.cache)
        self.front = Front(self.mesh_state, strict_readiness=settings.strict_readiness)
        self.front.on_global_trace_settings = self.follow_trace_settings
        self.control_port = 0
        self.front_grpc_port = 0
        self.front_http_port = 0
        self._control_server: grpc.aio.Server | None = None
        self._front_server: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._reconcile_task: asyncio.Task[None] | None = None
        self._certificates_task: asyncio.Task[None] | None = None
        self._warm = settings.warmup_secs <= 0 or self._restore_registry()
        self._saved_registry_version = self.registry.version if self.registry is not None else 0
        #: the registry (or Consul) version the current snapshot was made from
        self._published_source_version = -1

    def _restore_registry(self) -> bool:
        """Start the embedded registry from its saved file; True if there was one to start from."""
        path = self.settings.registry_file
        if self.registry is None or path is None:
            return False
        saved = load_instances(path)
        if saved is None:
            return False
        self.registry.restore(saved, self.settings.restored_lease_secs)
        return True

    def _save_registry(self) -> None:
        path = self.settings.registry_file
        if self.registry is None or path is None:
            return
        if self.registry.version == self._saved_registry_version:
            return
        try:
            save_instances(path, self.registry.instances())
            self._saved_registry_version = self.registry.version
        except OSError as exc:
            log.error("cannot save the registry to %s: %s", path, exc)

    def mesh_state(self) -> MeshState:
        s = self.settings
        return MeshState(
            instances=self.source.instances(),
            policies=self.policies.all(),
            front_grpc=Address(s.host, self.front_grpc_port) if self.front_grpc_port else None,
            front_http=Address(s.host, self.front_http_port) if self.front_http_port else None,
        )

    def follow_trace_settings(self, settings: dict[str, list[str]]) -> None:
        """TraceSetting changed the services' global sampling: the gateway, which starts the
        trace of every request that comes without one, samples the same share from now on."""
        tracing = self.settings.gateway_tracing
        percent = percent_from_trace_settings(settings)
        if tracing is None or percent is None or percent == tracing.sampling_percent:
            return
        log.info(
            "gateway trace sampling: %.4g%% → %.4g%% (TraceSetting)",
            tracing.sampling_percent,
            percent,
        )
        self.settings = replace(
            self.settings, gateway_tracing=replace(tracing, sampling_percent=percent)
        )
        self.publish()

    @property
    def routes_current(self) -> bool:
        """Whether the snapshot in the cache was made from the services as registered now (a
        registration is published only after the reconcile task's catch-up)."""
        return self._published_source_version == self.source.version

    def publish(self) -> str | None:
        """Translate the current state and hand the snapshot to ADS; returns its version.

        During the start-up warm-up nothing is published (the reconcile task publishes at its
        end); a bad state is logged and the last good snapshot stays.
        """
        if not self._warm:
            return None
        s = self.settings
        source_version = self.source.version
        resources = translate(
            self.mesh_state(),
            grpc_port=s.gateway_grpc_port,
            http_port=s.gateway_http_port,
            host=s.host,
            tracing=s.gateway_tracing,
            tls=s.gateway_tls,
            internal_grpc_port=s.gateway_internal_grpc_port,
        )
        if self.certificates is not None:
            resources = replace(resources, secrets=self.certificates.secrets())
        try:
            snapshot = make_snapshot(resources)
            changed = self.cache.set(snapshot)
            self._published_source_version = source_version
            if changed:
                log.info(
                    "xDS snapshot %s: %d cluster(s), %d endpoint set(s)",
                    snapshot.version[:12],
                    len(resources.clusters),
                    len(resources.endpoints),
                )
        except InconsistentSnapshot as exc:
            log.error("refused an inconsistent snapshot (Envoy keeps the last good one): %s", exc)
            return None
        except ValueError as exc:
            log.error("cannot translate the mesh state (Envoy keeps the last good config): %s", exc)
            return None
        return snapshot.version

    async def start(self) -> None:
        s = self.settings
        control = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, control)
        if self.registry is not None:
            registry_pb2_grpc.add_RegistryServicer_to_server(
                RegistryServicer(self.registry), control
            )  # type: ignore[no-untyped-call]
        self.control_port = control.add_insecure_port(f"{s.host}:{s.control_port}")
        if not self.control_port:
            raise OSError(f"cannot bind the control port {s.host}:{s.control_port}")
        front = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1),
            ]
        )
        add_front_to_server(self.front, front)
        self.front_grpc_port = front.add_insecure_port(f"{s.host}:{s.front_grpc_port}")
        if not self.front_grpc_port:
            raise OSError(f"cannot bind the front's gRPC port {s.host}:{s.front_grpc_port}")
        app = build_front_app(self.mesh_state, front=self.front)
        add_admin_routes(app, self)
        self._http = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._http.setup()
        site = web.TCPSite(self._http, s.host, s.front_http_port, reuse_address=True)
        await site.start()
        self.front_http_port = self._http.addresses[0][1]
        self.source.start()
        await control.start()
        await front.start()
        self._control_server, self._front_server = control, front
        self.publish()
        self._reconcile_task = asyncio.create_task(self._reconcile(), name="reconcile")
        if self.certificates is not None:
            self._certificates_task = asyncio.create_task(
                self.certificates.run(self.publish), name="tls-reload"
            )
        log.info(
            "control plane: ADS+registry on %s:%d, front gRPC :%d, front HTTP :%d",
            s.host,
            self.control_port,
            self.front_grpc_port,
            self.front_http_port,
        )

    async def _reconcile(self) -> None:
        if not self._warm:
            log.info(
                "warming up %.1f s: waiting for services to re-register", self.settings.warmup_secs
            )
            await asyncio.sleep(self.settings.warmup_secs)
            self._warm = True
            self.publish()
        seen = self.source.version
        while True:
            self._save_registry()
            seen = await self.source.wait_changed(seen)
            await self._catch_up()
            self.publish()

    async def _catch_up(self) -> None:
        """What was made through the gateway (shared-memory regions, log and trace settings)
        reaches the services that joined since, concurrently, before their routes are
        published."""
        steps = {
            "the shared memory regions": shared_regions.catch_up(self.front),
            "the log and trace settings": shared_settings.catch_up(self.front),
        }
        results = await asyncio.gather(*steps.values(), return_exceptions=True)
        for what, result in zip(steps, results, strict=True):
            if isinstance(result, Exception):
                log.error("making %s on joining services failed", what, exc_info=result)

    async def stop(self) -> None:
        for task in (self._reconcile_task, self._certificates_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for server in (self._front_server, self._control_server):
            if server is not None:
                await server.stop(1.0)
        if self._http is not None:
            await self._http.cleanup()
        await self.front.close()
        await self.source.close()
