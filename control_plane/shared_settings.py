"""Log and trace settings changed through the gateway, made again on services that join.

A client changes the mesh's log settings (LogSettings, ``POST /v2/logging``) or trace settings
(TraceSetting, ``POST /v2/trace/setting``, globally or per model) once, at the gateway; the
front makes the change on every service registered at that moment (``Front.everywhere``). A
service that joins later (a restart, a new replica) starts with its defaults. ``SettingsBook``
keeps the updates that every service accepted: the log settings, the global trace settings and
each model's, each the union of the keys updated (a later value overrides an earlier one; a trace
setting given with no value is cleared on the services, so it leaves the book), and which
instance has the latest of each scope. ``catch_up`` sends each instance that joined since one
request per scope it lacks; the control plane calls it on every registry change before it
publishes the change to Envoy, as for shared-memory regions (shared_regions.py), so a joining
service has the settings before the gateway routes to it.

Updates and replays of settings take ``SettingsBook.lock`` in turn, so a replay never overtakes an
update (nor the other way round) on a service that gets both. A replayed ``trace_count`` starts
the joining service's own count afresh, as the fan-out started each service's. Not booked:
settings changed on a service directly. The book lives in the control
plane's memory: after a restart of the control plane it starts empty (the services keep what they
have).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from control_plane.model import ServiceInstance
from protos.gen.inference import grpc_service_pb2 as pb
from services.core.errors import InvalidArgument
from services.core.trace_settings import updates_from_json

if TYPE_CHECKING:
    from control_plane.front_core import Front

log = logging.getLogger(__name__)

LogValue = pb.LogSettingsRequest.SettingValue
Plain = bool | int | str
#: the REST paths whose updates are booked (the front makes them on every service)
LOGGING_PATH = "/v2/logging"
TRACE_PATH = "/v2/trace/setting"
_UINT32_END = 2**32


@dataclass(frozen=True, slots=True)
class Scope:
    """What one replayed request sets: the log settings, or the trace settings of ``model``
    (empty: the global ones)."""

    trace: bool
    model: str = ""

    def __str__(self) -> str:
        if not self.trace:
            return "log settings"
        return f"trace settings of model '{self.model}'" if self.model else "global trace settings"


LOG = Scope(trace=False)
GLOBAL_TRACE = Scope(trace=True)


@dataclass(frozen=True, slots=True)
class Replay:
    """One request to send to an instance that lacks the book's settings of ``scope``."""

    instance: ServiceInstance
    scope: Scope
    #: the scope's version in the book when the request was made
    version: int
    request: pb.LogSettingsRequest | pb.TraceSettingRequest


def log_values_from_json(doc: Mapping[str, object]) -> dict[str, LogValue]:
    """A REST log settings update (``{"log_verbose_level": 1, ...}``) as LogSettings values, of
    the types the services accept (services/core/log_settings.py): a bool is ``bool_param``, an
    integer ``uint32_param``, a string ``string_param``. Anything else is left out (logged)."""
    values: dict[str, LogValue] = {}
    for key, value in doc.items():
        if isinstance(value, bool):
            values[key] = LogValue(bool_param=value)
        elif isinstance(value, int) and 0 <= value < _UINT32_END:
            values[key] = LogValue(uint32_param=value)
        elif isinstance(value, str):
            values[key] = LogValue(string_param=value)
        else:
            log.warning(
                "log setting %s=%r has no LogSettings form: services that join later will not "
                "get it",
                key,
                value,
            )
    return values


def _trace_model(path: str) -> str | None:
    """The model whose trace settings ``path`` is about ("": the global ones), else None."""
    if path == TRACE_PATH:
        return ""
    prefix, suffix = "/v2/models/", "/trace/setting"
    if path.startswith(prefix) and path.endswith(suffix):
        model = path[len(prefix) : -len(suffix)]
        if model and "/" not in model:
            return model
    return None


def _plain(value: LogValue) -> Plain:
    kind = value.WhichOneof("parameter_choice")
    if kind == "bool_param":
        return value.bool_param
    if kind == "uint32_param":
        return value.uint32_param
    return value.string_param


class SettingsBook:
    """The settings updates made through the front, and which instance has the latest of each
    scope. Use it from one event loop."""

    def __init__(self) -> None:
        self._log: dict[str, LogValue] = {}
        #: model ("" = global) → trace setting → its values
        self._trace: dict[str, dict[str, tuple[str, ...]]] = {}
        #: scope → how many updates of it were booked
        self._versions: dict[Scope, int] = {}
        #: instance id → scope → the version of it the instance has
        self._have: dict[str, dict[Scope, int]] = {}
        #: held while an update is made on the services and booked, and while ``catch_up`` runs
        self.lock = asyncio.Lock()

    # ---- updates that succeeded on every instance in ``on`` ------------------------------------
    def log_updated(self, request: pb.LogSettingsRequest, on: Iterable[ServiceInstance]) -> None:
        """A LogSettings update (values with no parameter set are ignored, as the services do)."""
        self._log_booked(
            {k: v for k, v in request.settings.items() if v.WhichOneof("parameter_choice")}, on
        )

    def trace_updated(self, request: pb.TraceSettingRequest, on: Iterable[ServiceInstance]) -> None:
        """A TraceSetting update, global or (``model_name``) of one model."""
        updates = {k: list(v.value) for k, v in request.settings.items()}
        self._trace_booked(request.model_name, updates, on)

    def rest_call(self, path: str, body: bytes, status: int, on: Sequence[ServiceInstance]) -> None:
        """Book a REST settings update the front passed on (``path`` decoded, ``status``: its
        answer's)."""
        model = _trace_model(path)
        if status != 200 or (path != LOGGING_PATH and model is None):
            return
        try:
            doc = json.loads(body or b"{}")
            if not isinstance(doc, dict):
                return  # the services accepted it, so this cannot happen; nothing to book
            if model is None:
                self._log_booked(log_values_from_json(doc), on)
            else:
                self._trace_booked(model, updates_from_json(doc), on)
        except (ValueError, InvalidArgument):
            return  # as above

    def _log_booked(self, updates: Mapping[str, LogValue], on: Iterable[ServiceInstance]) -> None:
        for key, value in updates.items():
            kept = LogValue()
            kept.CopyFrom(value)
            self._log[key] = kept
        self._booked(LOG, set(updates), set(self._log), on)

    def _trace_booked(
        self, model: str, updates: Mapping[str, Sequence[str]], on: Iterable[ServiceInstance]
    ) -> None:
        booked = self._trace.setdefault(model, {})
        for key, values in updates.items():
            if values:
                booked[key] = tuple(values)
            else:
                booked.pop(key, None)  # cleared: back to the default (a model: to the global)
        if not booked:
            del self._trace[model]
        self._booked(Scope(trace=True, model=model), set(updates), set(booked), on)

    def _booked(
        self, scope: Scope, updated: set[str], booked: set[str], on: Iterable[ServiceInstance]
    ) -> None:
        """A new version of ``scope``: an instance in ``on`` has it if it had the previous one,
        or if the update set every booked key (it then lacks none of them)."""
        if not updated:
            return
        old = self._versions.get(scope, 0)
        new = self._versions[scope] = old + 1
        for instance in on:
            have = self._have.setdefault(instance.id, {})
            if have.get(scope, 0) == old or booked <= updated:
                have[scope] = new

    # ---- instances that lack some -------------------------------------------------------------
    def missing(self, instances: Sequence[ServiceInstance]) -> list[Replay]:
        """The requests still to send; instances no longer registered are forgotten."""
        present = {i.id for i in instances}
        for gone in set(self._have) - present:
            del self._have[gone]
        requests = self._requests()
        return [
            Replay(instance, scope, self._versions[scope], request)
            for instance in instances
            for scope, request in requests.items()
            if self._have.get(instance.id, {}).get(scope, 0) != self._versions[scope]
        ]

    def made(self, replay: Replay) -> None:
        """``replay`` succeeded: its instance has its scope's settings as of ``replay.version``
        (behind still if the scope changed since)."""
        self._have.setdefault(replay.instance.id, {})[replay.scope] = replay.version

    def _requests(self) -> dict[Scope, pb.LogSettingsRequest | pb.TraceSettingRequest]:
        requests: dict[Scope, pb.LogSettingsRequest | pb.TraceSettingRequest] = {}
        if self._log:
            log_request = pb.LogSettingsRequest()
            for key, value in self._log.items():
                log_request.settings[key].CopyFrom(value)
            requests[LOG] = log_request
        for model, settings in self._trace.items():
            trace_request = pb.TraceSettingRequest(model_name=model)
            for key, values in settings.items():
                trace_request.settings[key].value.extend(values)
            requests[Scope(trace=True, model=model)] = trace_request
        return requests

    # ---- what is booked -------------------------------------------------------------------------
    def log_settings(self) -> dict[str, Plain]:
        return {key: _plain(value) for key, value in self._log.items()}

    def trace_settings(self) -> dict[str, dict[str, list[str]]]:
        """Model ("" = global) → setting → values."""
        return {m: {k: list(v) for k, v in s.items()} for m, s in self._trace.items()}


def _settings_of(request: pb.LogSettingsRequest | pb.TraceSettingRequest) -> dict[str, object]:
    if isinstance(request, pb.LogSettingsRequest):
        return {key: _plain(value) for key, value in request.settings.items()}
    return {key: list(value.value) for key, value in request.settings.items()}


async def catch_up(front: Front) -> None:
    """Send each registered instance the book's settings of every scope it lacks, concurrently.

    An instance that refuses one is logged (it runs with other settings than the rest of the
    mesh) and asked again at the next registry change. A model's trace settings refused as
    NOT_FOUND (a service that does not know the model) are nothing to do there; today's services
    keep a model's trace settings whether they serve it or not, so they answer OK. Nor are trace
    settings refused as UNIMPLEMENTED: that service exports no spans (tracing is off there).
    """
    book = front.shared_settings
    async with book.lock:
        replays = book.missing(front.state().instances)
        await asyncio.gather(*(_replay(front, replay) for replay in replays))


async def _replay(front: Front, replay: Replay) -> None:
    from control_plane.front_errors import FrontError

    instance, scope = replay.instance, replay.scope
    try:
        if isinstance(replay.request, pb.LogSettingsRequest):
            await front.call(
                instance,
                "LogSettings",
                replay.request,
                pb.LogSettingsResponse,
                rpc_timeout=front.fanout_timeout,
            )
        else:
            await front.call(
                instance,
                "TraceSetting",
                replay.request,
                pb.TraceSettingResponse,
                rpc_timeout=front.fanout_timeout,
            )
    except FrontError as exc:
        book = front.shared_settings
        if scope.trace and exc.code == grpc.StatusCode.UNIMPLEMENTED:
            # tracing is off there (no exporter): nothing to set, and asking again at each
            # registry change would only repeat this
            log.info("%s joined with tracing off: the %s are not made there", instance.id, scope)
            book.made(replay)
        elif scope.model and exc.code == grpc.StatusCode.NOT_FOUND:
            book.made(replay)  # a service that does not know the model: nothing to do there
        else:
            log.warning(
                "the %s changed through the gateway (%s) could not be made on %s, which joined "
                "later (tried again at the next registry change): %s",
                scope,
                _settings_of(replay.request),
                instance.id,
                exc.message,
            )
        return
    front.shared_settings.made(replay)
    log.info(
        "made the %s %s on %s, which joined after they were changed through the gateway",
        scope,
        _settings_of(replay.request),
        instance.id,
    )
