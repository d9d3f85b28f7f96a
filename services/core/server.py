"""Process assembly: model manager + data plane + gRPC, HTTP and metrics listeners + health.

``start_server`` binds everything (port 0 allowed) and returns a handle; ``serve`` runs until
SIGINT/SIGTERM and shuts down gracefully: health turns NOT_SERVING for good, the service
deregisters from the mesh and keeps serving until no request arrived for ``leave_quiet_secs``
(Envoy stopped sending here), then listeners stop taking new requests, in-flight requests finish
(batchers drain), and models are unloaded. With ``control_plane`` or ``consul``
set, a registrar announces the service once its models are loaded and again on every change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from protos.gen.health import health_pb2_grpc as hgrpc
from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from services.core import busy_poll, mesh_caller
from services.core.dataplane import DataPlane
from services.core.grpc_servicer import InferenceServicer
from services.core.grpc_translate import SERVICE
from services.core.health import HealthServicer
from services.core.host_metrics import HostMetricsCollector
from services.core.http_app import build_http_app
from services.core.identity import service_identity
from services.core.log_settings import configure_logging
from services.core.manager import ModelManager
from services.core.metrics import (
    MetricsServer,
    ModelMetricsSource,
    ProcessCollectors,
    TritonMetricsCollector,
    start_metrics_server,
)
from services.core.native_front import NativeFront, front_binary
from services.core.registration import (
    ConsulRegistrar,
    Registrar,
    RegistrationLoop,
    manager_models,
)
from services.core.response_cache import CacheMetricsCollector
from services.core.runtime import Runtime
from services.core.settings import ServerSettings, settings_from_args
from services.core.trace_config import collector_problem
from services.core.tracing import configure_tracing
from services.core.wire import deserialize_infer

log = logging.getLogger(__name__)


class ExitOnError(RuntimeError):
    """A model failed to load at start and --exit-on-error asks the service to stop."""


@dataclass(slots=True)
class RunningServer:
    settings: ServerSettings
    plane: DataPlane
    manager: ModelManager
    health: HealthServicer
    grpc_server: grpc.aio.Server | NativeFront
    grpc_port: int
    http_runner: web.AppRunner | None
    http_port: int
    metrics_server: MetricsServer | None
    metrics_port: int
    registrar: RegistrationLoop | None = field(default=None)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: not ready, no new requests, in-flight ones finish, models unloaded."""
        grace = self.settings.exit_timeout_secs if grace is None else grace
        self.plane.state.ready = False
        await self.health.enter_shutdown()
        if self.registrar is not None:
            # leave the mesh first and keep serving until the gateway stops sending here (EDS
            # update, or its health checks seeing NOT_SERVING); only then close the listeners
            self.manager.on_change = None
            await self.registrar.close()
            waited = await wait_quiet(
                lambda: self.plane.state.arrivals, self.settings.leave_quiet_secs, grace
            )
            log.info("left the mesh: no new request for %.1f s after %.2f s", *waited)
        log.info("shutting down: draining in-flight requests (up to %.0f s)", grace)
        stops: list[asyncio.Future[object] | asyncio.Task[object]] = []
        stops.append(asyncio.ensure_future(self.grpc_server.stop(grace)))
        if self.http_runner is not None:
            stops.append(asyncio.ensure_future(self.http_runner.cleanup()))
        await asyncio.gather(*stops, return_exceptions=True)
        self.plane.state.live = False
        await self.manager.close()
        mesh_caller.clear_home_loop(asyncio.get_running_loop())
        self.plane.shm.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        log.info("stopped")


async def wait_quiet(
    count: Callable[[], int], quiet_s: float, within_s: float, tick_s: float = 0.05
) -> tuple[float, float]:
    """Wait until ``count()`` has not changed for ``quiet_s`` seconds (at most ``within_s``);
    returns (quiet_s, seconds waited)."""
    loop = asyncio.get_running_loop()
    start = last_change = loop.time()
    seen = count()
    while quiet_s > 0 and loop.time() - last_change < quiet_s and loop.time() - start < within_s:
        await asyncio.sleep(tick_s)
        now, value = loop.time(), count()
        if value != seen:
            seen, last_change = value, now
    return quiet_s, loop.time() - start


class _HandlerTable:
    """Stands in for the server in the generated ``add_GRPCInferenceServiceServicer_to_server`` to
    read the method handler table it builds (the generated code hands it out no other way)."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(
        self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        """The same table as one generic handler: ``add_inference_service`` builds its own."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers.update(handlers)


def add_inference_service(
    servicer: InferenceServicer, server: grpc.aio.Server | NativeFront
) -> None:
    """Serve ``servicer`` as the generated ``add_GRPCInferenceServiceServicer_to_server`` would,
    except that ModelInfer and ModelStreamInfer messages are parsed by ``deserialize_infer``
    (wire.py: raw input tensors stay views over the received bytes, never copied)."""
    table = _HandlerTable()
    pbg.add_GRPCInferenceServiceServicer_to_server(servicer, table)  # type: ignore[no-untyped-call]
    if "ModelInfer" not in table.handlers:
        raise RuntimeError(
            "the generated add_GRPCInferenceServiceServicer_to_server registered no method table;"
            " regenerate the protos with the pinned grpcio-tools (make protos)"
        )
    handlers = dict(table.handlers)
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=deserialize_infer,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=deserialize_infer,
        response_serializer=pb.ModelStreamInferResponse.SerializeToString,
    )
    # both, as the generated code does: registered methods skip the generic lookup per call
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[union-attr]  # not in the grpc stubs yet


def _metrics_sources(manager: ModelManager) -> list[ModelMetricsSource]:
    return [
        ModelMetricsSource(
            m.name, m.version_str, m.stats, m.batcher.pending, m.config.max_batch_size
        )
        for m in manager.ready_models()
    ]


def build_registrar(
    settings: ServerSettings,
    manager: ModelManager,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
) -> RegistrationLoop | None:
    """The registrar the settings ask for (embedded registry or Consul), or None if standalone."""
    if not (settings.control_plane or settings.consul):
        return None
    if not settings.family:
        raise ValueError(
            "settings.family must name the service's framework family (e.g. 'onnx') to register "
            "with the mesh; run_service() takes it from the service's __main__"
        )
    identity = service_identity(
        settings.family, settings.host, grpc_port, http_port, metrics_port, settings.advertise_host
    )
    if settings.control_plane:
        return Registrar(
            settings.control_plane,
            identity,
            manager_models(manager),
            settings.registration_ttl_secs,
        )
    return ConsulRegistrar(settings.consul, identity, manager_models(manager))


def grpc_transport(settings: ServerSettings) -> grpc.aio.Server | NativeFront:
    """The gRPC server ``settings.grpc_frontend`` asks for (see native_front.py)."""
    binary = front_binary() if settings.grpc_frontend != "aio" else None
    if binary is not None:
        return NativeFront(binary, settings.max_message_bytes)
    if settings.grpc_frontend == "auto":
        log.info("gRPC served by grpc.aio: grpc_front is not built (make native)")
    if settings.grpc_frontend == "native":
        raise OSError(
            "--grpc-frontend native: grpc_front is not built; run `make native` (needs Debian's"
            " libgrpc++-dev) or set MESHSERVE_GRPC_FRONT to its path"
        )
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    return grpc.aio.server(options=options)


async def start_server(
    settings: ServerSettings, runtimes: Sequence[type[Runtime]]
) -> RunningServer:
    manager = ModelManager(settings, runtimes)
    flags = settings.flags
    plane = DataPlane(manager, settings.server_name, strict_readiness=flags.strict_readiness)
    plane.state.log_settings.update(flags.log_settings)
    health = HealthServicer()
    server = grpc_transport(settings)
    add_inference_service(InferenceServicer(plane), server)
    hgrpc.add_HealthServicer_to_server(health, server)  # type: ignore[no-untyped-call]
    grpc_host = flags.grpc_address or settings.host
    if isinstance(server, NativeFront):
        grpc_port = await server.start(grpc_host, settings.grpc_port)
    else:
        grpc_port = server.add_insecure_port(f"{grpc_host}:{settings.grpc_port}")
        if grpc_port == 0:
            raise OSError(f"cannot bind gRPC port {grpc_host}:{settings.grpc_port}")
        await server.start()

    http_runner: web.AppRunner | None = None
    http_port = -1
    if settings.http_port >= 0:
        http_runner = web.AppRunner(
            build_http_app(plane),
            access_log=None,
            handle_signals=False,
            # handlers still running after the grace period are cancelled
            shutdown_timeout=settings.exit_timeout_secs,
        )
        await http_runner.setup()
        site = web.TCPSite(
            http_runner, flags.http_address or settings.host, settings.http_port, reuse_address=True
        )
        await site.start()
        http_port = http_runner.addresses[0][1]

    metrics_server: MetricsServer | None = None
    metrics_port = -1
    if settings.metrics_port >= 0:
        registry = CollectorRegistry()
        registry.register(
            TritonMetricsCollector(lambda: _metrics_sources(manager), settings.metrics_config)
        )
        registry.register(ProcessCollectors())  # families added by add_process_collector
        if flags.allow_cpu_metrics:
            registry.register(HostMetricsCollector())
        if manager.response_cache is not None:
            registry.register(CacheMetricsCollector(manager.response_cache))
        metrics_server = await start_metrics_server(
            registry, flags.metrics_address or settings.host, settings.metrics_port
        )
        metrics_port = metrics_server.port

    running = RunningServer(
        settings,
        plane,
        manager,
        health,
        server,
        grpc_port,
        http_runner,
        http_port,
        metrics_server,
        metrics_port,
    )
    log.info(
        "listening: gRPC %s:%d, HTTP :%d, metrics :%d",
        settings.host,
        grpc_port,
        http_port,
        metrics_port,
    )
    # BLS calls from the models' worker threads run on this loop, over this service's front
    mesh_caller.set_home_loop(asyncio.get_running_loop())
    try:
        await manager.start()
        failed = [e for e in manager.index() if e.state == "UNAVAILABLE"]
        if failed and flags.exit_on_error:
            raise ExitOnError(
                "--exit-on-error: stopping, "
                + "; ".join(
                    f"model '{e.name}'{' version ' + e.version if e.version else ''}: {e.reason}"
                    for e in failed
                )
            )
    except BaseException:
        await running.stop(grace=0)
        raise
    plane.state.ready = True
    await health.set_serving(True)
    log.info("ready: %d model version(s) serving", len(manager.ready_models()))
    try:
        running.registrar = build_registrar(settings, manager, grpc_port, http_port, metrics_port)
    except BaseException:
        await running.stop(grace=0)
        raise
    if running.registrar is not None:
        manager.on_change = running.registrar.notify
        await running.registrar.start()
    return running


async def serve(settings: ServerSettings, runtimes: Sequence[type[Runtime]]) -> int:
    """Run until SIGINT or SIGTERM, then stop gracefully (exit status 0). A gRPC front that
    exits on its own also stops the service, with status 1, so that its supervisor restarts it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(settings, runtimes)
    waits = [asyncio.ensure_future(stop.wait())]
    if isinstance(running.grpc_server, NativeFront):  # the front died: stop, for a restart
        waits.append(asyncio.ensure_future(running.grpc_server.closed.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    front_died = not stop.is_set()
    if front_died:
        log.error("the gRPC front exited: stopping the service (exit status 1)")
    await running.stop()
    return 1 if front_died else 0


def run_service(
    runtimes: Sequence[type[Runtime]], argv: Sequence[str] | None, prog: str, family: str = ""
) -> int:
    """Entry point shared by every framework service's ``__main__`` (``family``: e.g. "onnx")."""
    settings = settings_from_args(argv, prog, family)
    try:
        configure_logging(settings.log_level, dict(settings.flags.log_settings))
    except OSError as exc:
        print(f"{prog}: --log-file: {exc}", file=sys.stderr)
        return 2
    if not settings.model_repository.is_dir():
        log.error("model repository %s is not a folder", settings.model_repository)
        return 2
    for flag, why in settings.flags.no_effect:
        log.warning("%s has no effect in meshserve: %s", flag, why)
    for value in settings.flags.unused_backend_config([rt.backend for rt in runtimes]):
        log.warning("--backend-config %s: no meshserve %s service reads it", value, family)
    problem = collector_problem(settings.flags.trace, os.environ)
    if problem:
        log.error("%s", problem)
        return 2
    # OpenTelemetry SDK, only when a collector is named (--trace-config or OTEL_EXPORTER_OTLP_*);
    # flushed once serve returns
    trace_control = configure_tracing(
        f"meshserve-{family or 'service'}", flags=settings.flags.trace
    )
    if settings.busy_poll_us:
        log.info(
            "event loop polls for %d µs before it sleeps (--busy-poll-us; 0 turns it off)",
            settings.busy_poll_us,
        )
    try:
        with asyncio.Runner(loop_factory=lambda: busy_poll.event_loop(settings.busy_poll_us)) as r:
            return r.run(serve(settings, runtimes))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except ExitOnError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if trace_control is not None:
            trace_control.shutdown()
