"""Registration: how a framework service announces itself and its model versions to the mesh.

Data flow: ModelManager (a model's state changes ─▶ ``notify()``) ─▶ ``Registrar`` ─gRPC
Register (lease heartbeat every ttl/3)─▶ the control plane's embedded registry ─▶ xDS ─▶ Envoy.
With Consul instead: ``ConsulRegistrar`` ─PUT /v1/agent/service/register─▶ the local Consul agent,
which health-checks the service over gRPC; the control plane's Consul source watches the catalog.

Both registrars keep the service serving while the registry is down: they log and retry with
backoff (up to ~2 s) and deregister on ``close()`` so Envoy stops sending before the drain.

Consul service Meta encoding (written here, parsed by ``control_plane/consul.py``)
--------------------------------------------------------------------------------------
Consul limits Meta to 64 pairs, keys of ``[A-Za-z0-9_-]`` up to 128 characters and values up to
512 characters, so the model list is JSON split into chunks:

* ``meshserve-family``: the framework family (also the tag ``family=<family>``)
* ``meshserve-grpc-port`` / ``meshserve-http-port`` / ``meshserve-metrics-port``: decimal ports
  (0 = no such listener); the service's ``Port`` is its gRPC port and ``Address`` its host
* ``meshserve-models-chunks``: N, the number of chunks
* ``meshserve-models-0`` … ``meshserve-models-<N-1>``: consecutive pieces of one compact JSON array
  of ``{"name", "version", "state", "reason", "platform", "stateful"}`` objects (states as
  RepositoryIndex reports them: READY, LOADING, UNLOADING, UNAVAILABLE; ``stateful``: the model
  has ``sequence_batching``); concatenate them in order and parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc

from protos.gen.meshserve import registry_pb2 as rpb
from protos.gen.meshserve import registry_pb2_grpc as rgrpc
from services.core.identity import ServiceIdentity
from services.core.manager import ModelManager
from services.core.model_state import ModelState

log = logging.getLogger(__name__)

CONSUL_SERVICE_NAME = "meshserve"
META_FAMILY = "meshserve-family"
META_GRPC_PORT = "meshserve-grpc-port"
META_HTTP_PORT = "meshserve-http-port"
META_METRICS_PORT = "meshserve-metrics-port"
META_MODEL_CHUNKS = "meshserve-models-chunks"
META_MODEL_CHUNK = "meshserve-models-{}"
META_VALUE_MAX = 512
META_PAIRS_MAX = 64
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model version as this service reports it to the registry."""

    name: str
    version: str
    state: str
    reason: str = ""
    platform: str = ""
    #: sequence-batched: the gateway keeps each sequence on one replica and version
    stateful: bool = False


ModelsFn = Callable[[], list[ModelStatus]]


def manager_models(manager: ModelManager) -> ModelsFn:
    """Model statuses from ``ModelManager.index()`` (models never loaded are left out)."""
    reportable = {s.value for s in ModelState}

    def models() -> list[ModelStatus]:
        out: list[ModelStatus] = []
        for e in manager.index():
            if e.state not in reportable:
                continue
            platform, stateful = "", False
            if e.state == ModelState.READY.value and e.version:
                with contextlib.suppress(Exception):
                    config = manager.config_of(e.name, e.version)
                    platform = config.platform
                    stateful = config.HasField("sequence_batching")
            out.append(ModelStatus(e.name, e.version, e.state, e.reason, platform, stateful))
        return out

    return models


class RegistrationLoop:
    """What both registrars share: ``start()`` pushes the whole state once, then again on
    ``notify()`` or every interval, retrying with backoff; ``close()`` deregisters."""

    def __init__(self, what: str, interval_s: float, max_backoff_s: float) -> None:
        self._what = what
        self._interval_s = interval_s
        self._max_backoff_s = max_backoff_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._closing = False
        self.registered = False

    async def _push(self) -> float | None:
        """Send the whole state; returns the next heartbeat interval (None = the default)."""
        raise NotImplementedError

    async def _attempt(self) -> float | None:
        try:
            interval = await self._push()
        except (grpc.aio.AioRpcError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            if not self._failing:
                log.warning(
                    "cannot register with %s (%s); retrying, still serving", self._what, exc
                )
            self._failing = True
            return None
        if self._failing or not self.registered:
            log.info("registered with %s", self._what)
        self._failing, self.registered = False, True
        return interval if interval is not None else self._interval_s

    async def start(self) -> None:
        """Register once now (a failure is logged, not raised), then keep the registration alive."""
        if self._task is not None:
            return
        first = await self._attempt()
        self._task = asyncio.create_task(self._run(first), name=f"registrar:{self._what}")

    def notify(self) -> None:
        """A model's state changed: register again at once."""
        self._wake.set()

    async def _run(self, delay: float | None) -> None:
        backoff = 0.1
        while not self._closing:
            if delay is None:
                delay, backoff = backoff, min(backoff * 2, self._max_backoff_s)
            else:
                backoff = 0.1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            if not self._closing:
                delay = await self._attempt()

    async def close(self) -> None:
        raise NotImplementedError

    async def _stop_loop(self) -> None:
        """Stop the loop, letting an attempt in flight finish (up to 2 s) so that ``registered``
        is true to what the registry knows and no late Register lands after the Deregister."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 2.0)
            self._task = None


class Registrar(RegistrationLoop):
    """Keeps this service registered with the control plane's embedded registry (gRPC lease)."""

    def __init__(
        self,
        address: str,
        identity: ServiceIdentity,
        models: ModelsFn,
        ttl_s: float = 3.0,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        super().__init__(f"control plane {address}", ttl_s / 3, max_backoff_s)
        self.address = address
        self.identity = identity
        self._models = models
        self._ttl_s = ttl_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: rgrpc.RegistryStub | None = None

    def _connect(self) -> rgrpc.RegistryStub:
        if self._stub is None:
            backoff_ms = int(self._max_backoff_s * 1000)
            self._channel = grpc.aio.insecure_channel(
                self.address,
                options=[
                    # reconnect soon after the control plane comes back (grpc's default is 120 s)
                    ("grpc.initial_reconnect_backoff_ms", min(200, backoff_ms)),
                    ("grpc.min_reconnect_backoff_ms", min(200, backoff_ms)),
                    ("grpc.max_reconnect_backoff_ms", backoff_ms),
                ],
            )
            self._stub = rgrpc.RegistryStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    def request(self) -> rpb.RegisterRequest:
        i = self.identity
        return rpb.RegisterRequest(
            instance=rpb.ServiceInstance(
                id=i.id,
                family=i.family,
                host=i.host,
                grpc_port=i.grpc_port,
                http_port=i.http_port,
                metrics_port=i.metrics_port,
                models=[rpb.ModelVersion(**dataclasses.asdict(m)) for m in self._models()],
            ),
            lease_ttl_ms=round(self._ttl_s * 1000),
        )

    async def _push(self) -> float | None:
        stub = self._connect()
        reply: rpb.RegisterResponse = await stub.Register(
            self.request(), timeout=max(self._interval_s, 0.5)
        )
        return reply.lease_ttl_ms / 3000 if reply.lease_ttl_ms else None

    async def close(self) -> None:
        """Stop heartbeats and deregister (best effort, 1 s), so Envoy stops sending here."""
        await self._stop_loop()
        if self._stub is not None:  # deregistering an unknown id is fine: always try
            try:
                await self._stub.Deregister(rpb.DeregisterRequest(id=self.identity.id), timeout=1.0)
                log.info("deregistered %s from %s", self.identity.id, self._what)
            except grpc.aio.AioRpcError as exc:
                log.warning("cannot deregister from %s: %s", self._what, exc.details())
        self.registered = False
        if self._channel is not None:
            await self._channel.close(None)
            self._channel, self._stub = None, None


# ---- Consul ---------------------------------------------------------------------------------
def _consul_duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def encode_models_meta(models: list[ModelStatus]) -> dict[str, str]:
    """The ``meshserve-models-*`` Meta pairs (see the module docstring); drops reasons if the
    list is too long, and raises ValueError if even that does not fit in Consul's Meta limits."""
    budget = META_PAIRS_MAX - 5
    for keep_reasons in (True, False):
        items = [dataclasses.asdict(m) for m in models]
        for item in items:
            item["reason"] = item["reason"] if keep_reasons else ""
        text = json.dumps(items, separators=(",", ":"), ensure_ascii=True)
        chunks = [text[i : i + META_VALUE_MAX] for i in range(0, len(text), META_VALUE_MAX)]
        if len(chunks) <= budget:
            meta = {META_MODEL_CHUNKS: str(len(chunks))}
            meta.update({META_MODEL_CHUNK.format(n): c for n, c in enumerate(chunks)})
            return meta
    raise ValueError(
        f"{len(models)} model versions do not fit in Consul service Meta "
        f"({budget} values of {META_VALUE_MAX} characters); serve fewer models per service "
        "or use the embedded registry (--control-plane)"
    )


def consul_registration_payload(
    identity: ServiceIdentity,
    models: list[ModelStatus],
    check_interval_s: float = 1.0,
    deregister_after_s: float = 60.0,
    service_name: str = CONSUL_SERVICE_NAME,
) -> dict[str, Any]:
    """The body of ``PUT /v1/agent/service/register`` for this service, with a gRPC health check
    on its overall health (``GRPC: host:port``). Consul reaps critical services no sooner than
    one minute, whatever ``deregister_after_s`` says."""
    i = identity
    meta = {
        META_FAMILY: i.family,
        META_GRPC_PORT: str(i.grpc_port),
        META_HTTP_PORT: str(i.http_port),
        META_METRICS_PORT: str(i.metrics_port),
    }
    meta.update(encode_models_meta(models))
    return {
        "ID": i.id,
        "Name": service_name,
        "Tags": [f"family={i.family}"],
        "Address": i.host,
        "Port": i.grpc_port,
        "Meta": meta,
        "Check": {
            "CheckID": f"service:{i.id}:grpc",
            "Name": f"gRPC health of {i.id}",
            "GRPC": f"{i.host}:{i.grpc_port}",
            "GRPCUseTLS": False,
            "Interval": _consul_duration(check_interval_s),
            "Timeout": _consul_duration(max(check_interval_s, 1.0)),
            "DeregisterCriticalServiceAfter": _consul_duration(deregister_after_s),
        },
    }


class ConsulRegistrar(RegistrationLoop):
    """Registers this service with the local Consul agent (same surface as ``Registrar``).

    The agent health-checks the service over gRPC, so there is no heartbeat: the service is
    registered at start, again on every ``notify()`` (its models changed), and retried with
    backoff while the agent cannot be reached.
    """

    def __init__(
        self,
        agent: str,
        identity: ServiceIdentity,
        models: ModelsFn,
        check_interval_s: float = 1.0,
        deregister_after_s: float = 60.0,
        service_name: str = CONSUL_SERVICE_NAME,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        base = agent if "://" in agent else f"http://{agent}"
        super().__init__(f"Consul agent {base}", 3600.0, max_backoff_s)
        self.base_url = base.rstrip("/")
        self.identity = identity
        self._models = models
        self._check_interval_s = check_interval_s
        self._deregister_after_s = deregister_after_s
        self._service_name = service_name
        self._session: aiohttp.ClientSession | None = None

    def payload(self) -> dict[str, Any]:
        return consul_registration_payload(
            self.identity,
            self._models(),
            self._check_interval_s,
            self._deregister_after_s,
            self._service_name,
        )

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return self._session

    async def _push(self) -> float | None:
        url = f"{self.base_url}/v1/agent/service/register"
        async with self._http().put(url, json=self.payload()) as resp:
            if resp.status != 200:
                raise aiohttp.ClientError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        return None

    async def close(self) -> None:
        """Deregister from the agent (best effort), so the catalog drops this instance at once."""
        await self._stop_loop()
        if self._session is not None:
            if self.registered:
                url = f"{self.base_url}/v1/agent/service/deregister/{self.identity.id}"
                try:
                    async with self._session.put(url) as resp:
                        resp.raise_for_status()
                    log.info("deregistered %s from %s", self.identity.id, self._what)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("cannot deregister from %s: %s", self._what, exc)
            await self._session.close()
            self._session = None
        self.registered = False
