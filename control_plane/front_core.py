"""The front's transport-agnostic core: registry look-ups, forwarding, fan-out and merging.

Where it sits: Envoy routes each model-scoped request to its model's cluster; everything else
(server-level RPCs, model control, shared memory) and every model-scoped request Envoy could not
route (an unknown model, or a compressed message its body-field extraction cannot read) reaches
the control plane's front. ``front.py`` (gRPC) and ``front_http.py`` (REST) are thin adapters
over the ``Front`` here, which reaches the services over grpc.aio, one cached channel per
instance address.

Decisions (documented here, to be folded into DESIGN):

* ServerReady: true when the registry has at least one instance and no instance reports a model
  version LOADING (a mesh still loading is not ready, as Triton is not while it loads); with
  ``--strict-readiness``, every registered model version READY or unloaded on request.
* ServerMetadata extensions: the intersection of what every answering service advertises and
  what the front itself can route (``FRONT_EXTENSIONS``); the front's own set when none answers.
* RepositoryIndex: every instance asked concurrently (``fanout_timeout``); one that fails is
  skipped and logged; entries merged by (name, version), a READY entry winning.
* Load/Unload go to the owners (instances whose index lists the model, loaded or not); with
  several replicas all must succeed. No owner: NOT_FOUND naming the model.
* Shared memory (system, CUDA), log and trace settings: made on every instance (co-located
  mesh), all must succeed; the answer (e.g. status) is the first instance's. System regions and
  log and trace settings made this way are also made on instances that join later
  (shared_regions.py, shared_settings.py).
* Model-scoped requests go to an instance that has the version READY in the registry (round
  robin); failing that, to one that has it registered in another state, so the service gives its
  own reason; otherwise NOT_FOUND "unknown model '<name>'". ModelReady answers ready=false
  instead of an error, as Triton does. Streams are pinned by their first message.
* ModelStatistics: asked of every instance that has the model (every instance for an empty
  name); entries of one (name, version) from several replicas are summed.

Errors are ``FrontError`` (front_errors.py: gRPC status + message; the HTTP code comes from one
table in front_http); a service's own error keeps its status and message. Each transport
translates them in one place.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from control_plane.front_errors import FrontError, all_or_raise, answered
from control_plane.model import Address, MeshState, ServiceInstance
from control_plane.shared_regions import RegionBook
from control_plane.shared_settings import SettingsBook
from control_plane.stats_merge import merge_statistics
from protos.gen.inference import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

SERVER_NAME = "meshserve"
LOADING = "LOADING"
READY = "READY"
#: what the front can route for the whole mesh (over both transports)
FRONT_EXTENSIONS = (
    "classification",
    "sequence",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "system_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "trace",
    "logging",
)
#: tritonclient allows messages up to INT32_MAX; so do the services and the front
MAX_MESSAGE_BYTES = 2**31 - 1
_SERVICE = "/inference.GRPCInferenceService/"

M = TypeVar("M", bound=Message)


def serialize(message: Message) -> bytes:
    """A request's wire bytes (the grpc serializer for every RPC the front sends)."""
    return message.SerializeToString()


def server_version() -> str:
    """The installed meshserve version (the services report the same package's)."""
    try:
        return importlib.metadata.version("meshserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class Front:
    """Registry look-ups, forwarding and fan-out to the services; used by both transports.

    ``state`` returns the current registry view (cheap, called per request). Use one Front from
    one event loop; ``close`` closes every channel it made.
    """

    def __init__(
        self,
        state: Callable[[], MeshState],
        *,
        fanout_timeout: float = 5.0,
        strict_readiness: bool = False,
    ) -> None:
        self.state = state
        self.fanout_timeout = fanout_timeout
        self.strict_readiness = strict_readiness
        self._channels: dict[Address, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._turn = itertools.count()
        self._closed = False
        #: called with the services' answer to a global TraceSetting update ({name: values}),
        #: so the gateway's own sampling can follow (set by the control plane)
        self.on_global_trace_settings: Callable[[dict[str, list[str]]], None] | None = None
        #: shared-memory regions registered through the front (made again on services that join)
        self.regions = RegionBook()
        #: log and trace settings changed through the front (made again on services that join)
        self.shared_settings = SettingsBook()

    def global_trace_settings_changed(self, settings: dict[str, list[str]]) -> None:
        if self.on_global_trace_settings is not None:
            try:
                self.on_global_trace_settings(settings)
            except Exception:
                log.exception("applying the new trace settings to the gateway failed")

    # ---- registry view -----------------------------------------------------------------------
    def live(self) -> bool:
        return not self._closed

    def ready(self) -> bool:
        instances = self.state().instances
        if self.strict_readiness:
            settled = all(
                m.state == READY or m.reason == "unloaded" for i in instances for m in i.models
            )
        else:
            settled = all(m.state != LOADING for i in instances for m in i.models)
        return not self._closed and bool(instances) and settled

    def instances_of(self, model: str, version: str = "") -> list[ServiceInstance]:
        """Instances with the version READY (any version when ``version`` is empty); failing
        that, those that have it registered in another state (the service says why)."""
        registered = [
            i
            for i in self.state().instances
            if any(m.name == model and version in ("", m.version) for m in i.models)
        ]
        ready = [
            i
            for i in registered
            if any(m.name == model and version in ("", m.version) for m in i.ready_versions())
        ]
        return ready or registered

    def not_found(self, model: str, version: str) -> FrontError:
        """NOT_FOUND for a model no service has, or a version of it none has."""
        if version:
            known = sorted(
                {m.version for i in self.state().instances for m in i.models if m.name == model},
                key=lambda v: (len(v), v),
            )
            if known:
                return FrontError.unknown_version(model, version, known)
        return FrontError.unknown_model(model)

    def route(self, model: str, version: str) -> ServiceInstance:
        """One instance with the model READY for a model-scoped request (round robin).

        Through the gateway a model with no READY version is NOT_FOUND (its route is gone),
        whether no service knows it or it was unloaded; the message carries the registry's
        state and reason.
        """
        candidates = self.instances_of(model, version)
        if not candidates:
            raise self.not_found(model, version)
        ready = [
            i
            for i in candidates
            if any(m.name == model and version in ("", m.version) for m in i.ready_versions())
        ]
        if not ready:
            states = sorted(
                {
                    f"version {m.version or '-'} {m.state}" + (f": {m.reason}" if m.reason else "")
                    for i in candidates
                    for m in i.models
                    if m.name == model and version in ("", m.version)
                }
            )
            raise FrontError(
                grpc.StatusCode.NOT_FOUND,
                f"model '{model}' is not loaded ({'; '.join(states)}); load it first",
            )
        return ready[next(self._turn) % len(ready)]

    # ---- transport ---------------------------------------------------------------------------
    def channel(self, inst: ServiceInstance) -> grpc.aio.Channel:
        address = Address(inst.host, inst.grpc_port)
        channel = self._channels.get(address)
        if channel is None:
            self._prune()
            channel = grpc.aio.insecure_channel(
                f"{inst.host}:{inst.grpc_port}",
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ],
            )
            self._channels[address] = channel
        return channel

    def _prune(self) -> None:
        """Close the channels of addresses that left the registry (kept tasks, awaited on close)."""
        current = {Address(i.host, i.grpc_port) for i in self.state().instances}
        for address in [a for a in self._channels if a not in current]:
            task = asyncio.create_task(self._channels.pop(address).close(None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def call(
        self,
        inst: ServiceInstance,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        rpc_timeout: float | None = None,
        metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> M:
        """One unary RPC of inference.GRPCInferenceService on ``inst``."""
        stub = self.channel(inst).unary_unary(
            _SERVICE + method,
            request_serializer=serialize,
            response_deserializer=response_type.FromString,
        )
        try:
            response: M = await stub(request, timeout=rpc_timeout, metadata=tuple(metadata))
        except grpc.aio.AioRpcError as exc:
            raise FrontError.from_rpc(exc, inst) from None
        return response

    async def gather(
        self,
        instances: Sequence[ServiceInstance],
        method: str,
        request: Message,
        response_type: type[M],
        rpc_timeout: float | None,
    ) -> list[tuple[ServiceInstance, M | FrontError]]:
        """The same RPC on every instance concurrently; each answer or error, in order."""

        async def one(inst: ServiceInstance) -> M | FrontError:
            try:
                return await self.call(
                    inst, method, request, response_type, rpc_timeout=rpc_timeout
                )
            except FrontError as exc:
                return exc

        answers = await asyncio.gather(*(one(i) for i in instances))
        return list(zip(instances, answers, strict=True))

    async def everywhere(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        rpc_timeout: float | None,
        instances: Sequence[ServiceInstance] | None = None,
    ) -> M:
        """The RPC on every registered instance (or on ``instances``); all must succeed; the
        first one's answer."""
        instances = self.state().instances if instances is None else instances
        if not instances:
            raise FrontError(grpc.StatusCode.UNAVAILABLE, "no service is registered")
        answers = await self.gather(instances, method, request, response_type, rpc_timeout)
        return all_or_raise(answers)[0]

    async def close(self) -> None:
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close(None) for c in channels), *self._closing)

    # ---- server-level answers ----------------------------------------------------------------
    async def metadata(self) -> pb.ServerMetadataResponse:
        answers = await self.gather(
            self.state().instances,
            "ServerMetadata",
            pb.ServerMetadataRequest(),
            pb.ServerMetadataResponse,
            self.fanout_timeout,
        )
        extensions = set(FRONT_EXTENSIONS)
        for answer in answered(answers, "ServerMetadata"):
            extensions &= set(answer.extensions)
        return pb.ServerMetadataResponse(
            name=SERVER_NAME,
            version=server_version(),
            extensions=[e for e in FRONT_EXTENSIONS if e in extensions],
        )

    async def index_by_instance(
        self, ready_only: bool
    ) -> list[tuple[ServiceInstance, pb.RepositoryIndexResponse | FrontError]]:
        request = pb.RepositoryIndexRequest(ready=ready_only)
        return await self.gather(
            self.state().instances,
            "RepositoryIndex",
            request,
            pb.RepositoryIndexResponse,
            self.fanout_timeout,
        )

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        merged: dict[tuple[str, str], pb.RepositoryIndexResponse.ModelIndex] = {}
        for answer in answered(await self.index_by_instance(ready_only), "RepositoryIndex"):
            for entry in answer.models:
                key = (entry.name, entry.version)
                if key not in merged or entry.state == "READY":
                    merged[key] = entry
        return pb.RepositoryIndexResponse(models=[merged[k] for k in sorted(merged)])

    async def owners(self, model: str) -> list[ServiceInstance]:
        """Instances whose repository index lists ``model`` (loaded or not), or NOT_FOUND."""
        answers = await self.index_by_instance(False)
        owners = [
            inst
            for inst, answer in answers
            if not isinstance(answer, FrontError) and any(m.name == model for m in answer.models)
        ]
        if not owners:
            silent = [i.id for i, a in answers if isinstance(a, FrontError)]
            if silent:
                raise FrontError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no service that answered knows model '{model}'; "
                    f"{', '.join(silent)} did not answer",
                )
            raise FrontError.unknown_model(model)
        return owners

    async def control(
        self,
        method: str,
        request: Message,
        response_type: type[Message],
        model: str,
        rpc_timeout: float | None,
    ) -> None:
        """RepositoryModelLoad / RepositoryModelUnload on every owner of ``model``."""
        owners = await self.owners(model)
        all_or_raise(await self.gather(owners, method, request, response_type, rpc_timeout))

    async def statistics(
        self, name: str, version: str, rpc_timeout: float | None
    ) -> pb.ModelStatisticsResponse:
        instances = self.instances_of(name, version) if name else list(self.state().instances)
        if name and not instances:
            raise self.not_found(name, version)
        request = pb.ModelStatisticsRequest(name=name, version=version)
        answers = await self.gather(
            instances, "ModelStatistics", request, pb.ModelStatisticsResponse, rpc_timeout
        )
        stats = answered(answers, "ModelStatistics")
        if name and not stats:
            all_or_raise(answers)
        return merge_statistics(stats)
