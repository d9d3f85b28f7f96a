"""The Consul source: the other registry backend, read from Consul's catalog instead of leases.

Data flow: a service's ``ConsulRegistrar`` ─agent API─▶ Consul (gRPC health check) ─▶ blocking
queries on ``/v1/health/service/<name>?passing=1`` ─▶ ``ConsulSource`` ─▶ ``instances()`` /
``version`` / ``wait_changed`` (the same surface as the embedded ``Registry``) ─▶ translation ─▶
xDS. Only instances whose health checks all pass count, so a failing check or a dead service
leaves EDS within a check interval or two.

Index handling follows Consul's blocking-query documentation: the next query waits on the
returned ``X-Consul-Index``; an index that goes backwards resets the loop to 0 (one non-blocking
query, then block again); an index that is not above 0 is treated as 1 so the next query blocks
rather than spinning. A query returning with nothing changed does not bump ``version``. While
Consul cannot be reached the last known instances stay (Envoy's own health checks guard them) and
the query is retried with backoff.

The service Meta encoding (family, ports, chunked JSON model list) is documented once, in
``services/core/registration.py``, which writes it; this module only parses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Mapping
from typing import Any

import consul.aio

from control_plane.model import ModelVersion, ServiceInstance

log = logging.getLogger(__name__)

DEFAULT_SERVICE = "meshserve"
META_FAMILY = "meshserve-family"
META_GRPC_PORT = "meshserve-grpc-port"
META_HTTP_PORT = "meshserve-http-port"
META_METRICS_PORT = "meshserve-metrics-port"
META_MODEL_CHUNKS = "meshserve-models-chunks"
META_MODEL_CHUNK = "meshserve-models-{}"


class BadServiceEntry(ValueError):
    """A catalog entry that does not carry meshserve's Meta encoding."""


def _models_from_meta(meta: Mapping[str, str]) -> tuple[ModelVersion, ...]:
    try:
        chunks = int(meta.get(META_MODEL_CHUNKS, "0"))
        text = "".join(meta[META_MODEL_CHUNK.format(n)] for n in range(chunks))
        items = json.loads(text) if text else []
        return tuple(
            ModelVersion(
                name=str(m["name"]),
                version=str(m["version"]),
                state=str(m["state"]),
                reason=str(m.get("reason", "")),
                platform=str(m.get("platform", "")),
                stateful=m.get("stateful", False) is True,
            )
            for m in items
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise BadServiceEntry(f"models in Meta cannot be read ({exc})") from exc


def _port(meta: Mapping[str, str], key: str, default: int = 0) -> int:
    try:
        return int(meta.get(key, default))
    except ValueError:
        raise BadServiceEntry(f"Meta {key}={meta.get(key)!r} is not a port") from None


def instance_from_entry(entry: Mapping[str, Any]) -> ServiceInstance:
    """One ``/v1/health/service`` entry ─▶ ServiceInstance; raises BadServiceEntry."""
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    meta: Mapping[str, str] = service.get("Meta") or {}
    instance_id = service.get("ID") or ""
    family = meta.get(META_FAMILY, "")
    host = service.get("Address") or node.get("Address") or ""
    grpc_port = _port(meta, META_GRPC_PORT, int(service.get("Port") or 0))
    if not (instance_id and family and host and grpc_port):
        raise BadServiceEntry(
            f"service {instance_id!r} lacks an ID, the {META_FAMILY} Meta, an address or a port; "
            "register it with consul_registration_payload()"
        )
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise BadServiceEntry(
            f"service {instance_id!r}: address {host!r} is not an IP address; the gateway reaches "
            "services by IP (start the service with --advertise-host <its IP>)"
        ) from None
    models = _models_from_meta(meta)
    return ServiceInstance(
        id=instance_id,
        family=family,
        host=host,
        grpc_port=grpc_port,
        http_port=_port(meta, META_HTTP_PORT),
        metrics_port=_port(meta, META_METRICS_PORT),
        models=tuple(sorted(models, key=lambda m: (m.name, m.version))),
    )


def _all_passing(entry: Mapping[str, Any]) -> bool:
    return all(c.get("Status") == "passing" for c in entry.get("Checks") or [])


def instances_from_entries(entries: list[Mapping[str, Any]]) -> tuple[ServiceInstance, ...]:
    """Passing, well-formed entries as instances sorted by id (bad ones are logged and skipped)."""
    found: dict[str, ServiceInstance] = {}
    for entry in entries:
        if not _all_passing(entry):
            continue
        try:
            instance = instance_from_entry(entry)
        except BadServiceEntry as exc:
            log.warning("ignoring a Consul catalog entry: %s", exc)
            continue
        found[instance.id] = instance
    return tuple(found[i] for i in sorted(found))


def next_index(previous: int, returned: int) -> int:
    """The index the next blocking query waits on, as Consul's blocking-query docs prescribe."""
    if returned < previous:
        return 0  # went backwards (snapshot restore, server change): restart the loop
    return max(returned, 1)  # never 0 after a response: an index of 0 would not block


class ConsulSource:
    """Watches Consul's catalog for meshserve instances; same read surface as ``Registry``.

    Use from one event loop: ``start()`` there, ``close()`` on shutdown.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:8500",
        service: str = DEFAULT_SERVICE,
        wait_s: float = 30.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Consul agent address must be host:port, got {address!r}")
        self._host, self._port = host, int(port)
        self.service = service
        self._wait_s = wait_s
        self._max_backoff_s = max_backoff_s
        self._client: Any = None
        self._index = 0
        self._instances: tuple[ServiceInstance, ...] = ()
        self._version = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- the source surface -----------------------------------------------------------------
    def instances(self) -> tuple[ServiceInstance, ...]:
        return self._instances

    @property
    def version(self) -> int:
        return self._version

    @property
    def index(self) -> int:
        """The Consul index the next query waits on (0 = the next query does not block)."""
        return self._index

    async def wait_changed(self, since_version: int) -> int:
        """Wait until ``version`` differs from ``since_version``; returns the new version."""
        while self._version == since_version:
            await self._changed.wait()
        return self._version

    # ---- watching -------------------------------------------------------------------------------
    def _consul(self) -> Any:
        if self._client is None:
            self._client = consul.aio.Consul(
                host=self._host,
                port=self._port,
                verify=False,  # plain HTTP to the agent; no TLS context to build
                # a blocking query may last wait + wait/16 of jitter; fail only well past that
                connections_timeout=self._wait_s * 1.25 + 5,
            )
        return self._client

    async def poll_once(self) -> bool:
        """One query (blocking when an index is known); returns whether the instances changed."""
        index, entries = await self._consul().health.service(
            self.service,
            index=self._index or None,
            wait=f"{max(1, round(self._wait_s * 1000))}ms",
            passing=True,
        )
        returned = int(index) if index is not None else 0
        new_index = next_index(self._index, returned)
        if new_index == 0:
            log.info("Consul index went back (%d after %d); re-reading", returned, self._index)
        self._index = new_index
        instances = instances_from_entries(entries or [])
        if instances == self._instances:
            return False
        self._instances = instances
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        log.info("Consul: %d meshserve instance(s) passing", len(instances))
        return True

    async def _watch(self) -> None:
        backoff = 0.1
        failing = False
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning(
                        "cannot query Consul at %s:%d (%s); keeping the last known instances "
                        "and retrying",
                        self._host,
                        self._port,
                        exc,
                    )
                failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            if failing:
                log.info("Consul at %s:%d reachable again", self._host, self._port)
            failing, backoff = False, 0.1

    def start(self) -> None:
        """Start the watch (call from the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="consul-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.close()
            self._client = None
