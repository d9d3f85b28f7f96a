"""The embedded registry: where framework services announce themselves (the default source).

Data flow: a service's ``Registrar`` ─gRPC Register/Deregister─▶ ``RegistryServicer`` ─▶
``Registry`` (instances with leases) ─▶ ``instances()`` / ``version`` / ``wait_changed`` ─▶ the
control plane's translation ─▶ xDS. ``ConsulSource`` offers the same read surface.

Register is an idempotent upsert of an instance's whole state and doubles as its lease heartbeat:
a Register that changes nothing only renews the lease and does not bump ``version``, so heartbeats
cause no xDS churn. An instance not heard from within its lease is removed by the expiry task
(within ``sweep_interval_s`` of the deadline) and so leaves EDS within seconds.

``Registry`` is used from the event loop's thread only; the clock is injectable (monotonic seconds)
so tests drive leases without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from control_plane.model import ModelVersion, ServiceInstance
from protos.gen.meshserve import registry_pb2 as rpb
from protos.gen.meshserve import registry_pb2_grpc as rgrpc

log = logging.getLogger(__name__)

Clock = Callable[[], float]

DEFAULT_TTL_S = 3.0
MIN_TTL_S = 1.0
MAX_TTL_S = 60.0
#: the model states a service may report (as RepositoryIndex reports them)
MODEL_STATES = frozenset({"READY", "LOADING", "UNLOADING", "UNAVAILABLE"})


@dataclass(slots=True)
class _Lease:
    instance: ServiceInstance
    ttl_s: float
    deadline: float


def clamp_ttl(asked_s: float, default_s: float = DEFAULT_TTL_S) -> float:
    """The TTL the registry applies: the default for 0 (or less), else clamped to [1 s, 60 s]."""
    if asked_s <= 0:
        return default_s
    return min(MAX_TTL_S, max(MIN_TTL_S, asked_s))


def _normalized(instance: ServiceInstance) -> ServiceInstance:
    """``instance`` with its models in (name, version) order, so equal states compare equal."""
    models = tuple(sorted(instance.models, key=lambda m: (m.name, m.version)))
    return dataclasses.replace(instance, models=models)


class Registry:
    """In-memory service instances with leases, and a version that bumps on effective changes."""

    def __init__(
        self,
        clock: Clock = time.monotonic,
        default_ttl_s: float = DEFAULT_TTL_S,
        sweep_interval_s: float = 0.25,
    ) -> None:
        self._clock = clock
        self._default_ttl_s = clamp_ttl(default_ttl_s)
        self._sweep_interval_s = sweep_interval_s
        self._leases: dict[str, _Lease] = {}
        self._version = 0
        self._changed = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    # ---- writes ------------------------------------------------------------------------------
    def register(self, instance: ServiceInstance, ttl_s: float = 0) -> float:
        """Upsert ``instance`` and renew its lease; returns the TTL applied (clamped)."""
        ttl = clamp_ttl(ttl_s, self._default_ttl_s)
        normalized = _normalized(instance)
        old = self._leases.get(instance.id)
        self._leases[instance.id] = _Lease(normalized, ttl, self._clock() + ttl)
        if old is None:
            log.info(
                "registered %s (%s at %s:%d, %d model version(s))",
                instance.id,
                instance.family,
                instance.host,
                instance.grpc_port,
                len(instance.models),
            )
            self._bump()
        elif old.instance != normalized:
            log.info("instance %s updated its state", instance.id)
            self._bump()
        return ttl

    def restore(self, instances: Iterable[ServiceInstance], grace_s: float) -> None:
        """Take back the instances saved before a restart, each on a ``grace_s`` lease: the
        instance's next Register renews it as usual; one that never comes back expires."""
        deadline = self._clock() + grace_s
        for instance in instances:
            self._leases[instance.id] = _Lease(_normalized(instance), grace_s, deadline)
        if self._leases:
            log.info(
                "restored %d instance(s) saved before the restart; each has %.1f s to re-register",
                len(self._leases),
                grace_s,
            )
            self._bump()

    def deregister(self, instance_id: str) -> bool:
        """Remove an instance at once; False if it was not registered (not an error)."""
        if self._leases.pop(instance_id, None) is None:
            return False
        log.info("deregistered %s", instance_id)
        self._bump()
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """Remove every instance whose lease ran out by ``now``; returns their ids."""
        now = self._clock() if now is None else now
        gone = sorted(i for i, lease in self._leases.items() if lease.deadline <= now)
        for instance_id in gone:
            lease = self._leases.pop(instance_id)
            log.warning(
                "lease of %s ran out (not heard from for %.1f s); removed", instance_id, lease.ttl_s
            )
        if gone:
            self._bump()
        return gone

    def _bump(self) -> None:
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # ---- reads (the source surface the control plane uses) ------------------------------------
    def instances(self) -> tuple[ServiceInstance, ...]:
        return tuple(self._leases[i].instance for i in sorted(self._leases))

    @property
    def version(self) -> int:
        return self._version

    async def wait_changed(self, since_version: int) -> int:
        """Wait until ``version`` differs from ``since_version``; returns the new version."""
        while self._version == since_version:
            await self._changed.wait()
        return self._version

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background expiry task (call from the running loop)."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="registry-expiry")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                self.expire()
            except Exception:
                log.exception("registry expiry sweep failed")


# ---- gRPC ---------------------------------------------------------------------------------------
class InvalidRegistration(ValueError):
    """A Register request the registry refuses; the message says what to fix."""


def instance_from_proto(msg: rpb.ServiceInstance) -> ServiceInstance:
    """Validate a registered instance and convert it; raises InvalidRegistration."""
    missing = [f for f in ("id", "family", "host") if not getattr(msg, f)]
    if missing:
        raise InvalidRegistration(
            f"instance.{', instance.'.join(missing)} must be set "
            f"(id unique per process, e.g. 'onnx-<host>-<pid>'; family e.g. 'onnx'; "
            f"host the address Envoy reaches the service at)"
        )
    try:
        ipaddress.ip_address(msg.host)
    except ValueError:
        # Envoy takes EDS endpoints by IP only and would refuse the whole update for one name
        raise InvalidRegistration(
            f"instance {msg.id!r}: host {msg.host!r} is not an IP address; the gateway reaches "
            "services by IP (start the service with --advertise-host <its IP>)"
        ) from None
    if msg.grpc_port == 0:
        raise InvalidRegistration(
            f"instance {msg.id!r}: grpc_port must be set to the port the service's gRPC listener "
            "is bound to (not 0)"
        )
    for field in ("grpc_port", "http_port", "metrics_port"):
        if getattr(msg, field) > 65535:
            raise InvalidRegistration(
                f"instance {msg.id!r}: {field} {getattr(msg, field)} is not a TCP port (1-65535)"
            )
    models: list[ModelVersion] = []
    for m in msg.models:
        if not m.name:
            raise InvalidRegistration(f"instance {msg.id!r}: every model needs a name")
        if m.state not in MODEL_STATES:
            raise InvalidRegistration(
                f"instance {msg.id!r}: model {m.name!r} version {m.version!r} has state "
                f"{m.state!r}; use one of {', '.join(sorted(MODEL_STATES))}"
            )
        if m.state == "READY" and not m.version:
            raise InvalidRegistration(
                f"instance {msg.id!r}: READY model {m.name!r} must name its version"
            )
        models.append(ModelVersion(m.name, m.version, m.state, m.reason, m.platform, m.stateful))
    return ServiceInstance(
        id=msg.id,
        family=msg.family,
        host=msg.host,
        grpc_port=msg.grpc_port,
        http_port=msg.http_port,
        metrics_port=msg.metrics_port,
        models=tuple(models),
    )


class RegistryServicer(rgrpc.RegistryServicer):
    """``meshserve.registry.v1.Registry`` over one ``Registry`` (grpc.aio)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def Register(  # noqa: N802 - the RPC's name
        self, request: rpb.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rpb.RegisterResponse:
        if not request.HasField("instance"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "RegisterRequest.instance must be set (the service's id, family, host, ports "
                "and models)",
            )
        try:
            instance = instance_from_proto(request.instance)
        except InvalidRegistration as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        ttl = self._registry.register(instance, request.lease_ttl_ms / 1000.0)
        return rpb.RegisterResponse(lease_ttl_ms=round(ttl * 1000))

    async def Deregister(  # noqa: N802 - the RPC's name
        self, request: rpb.DeregisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rpb.DeregisterResponse:
        self._registry.deregister(request.id)
        return rpb.DeregisterResponse()
