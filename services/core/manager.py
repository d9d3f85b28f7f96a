"""Model lifecycle: what is loaded, in which state, and the control modes none / poll / explicit.

Data flow: repository (layout, config) ─▶ ModelManager (config completed by the runtime and
validated: model_prep.py; versions chosen by policy) ─▶ ServedModel per version. The data plane
asks the manager for a READY version on every request (``get``, a dictionary look-up); loads,
reloads and unloads swap versions in and drain the old ones, so nothing in flight is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from protos.gen.inference import model_config_pb2 as mc
from services.core import repository as repo
from services.core.errors import (
    InvalidArgument,
    ModelLoadError,
    NotFound,
    ServingError,
    Unavailable,
    UnknownModel,
)
from services.core.latency_metrics import LatencyRecorder
from services.core.model import ServedModel
from services.core.model_prep import prepare_config, serves
from services.core.model_state import (
    UNLOADED,
    IndexEntry,
    ModelEntry,
    ModelState,
    VersionEntry,
)
from services.core.rate_limiter import RateLimiter
from services.core.response_cache import ResponseCache
from services.core.runtime import Runtime
from services.core.settings import ServerSettings

log = logging.getLogger(__name__)


class ModelManager:
    """Owns every model of one service. Use from the event loop thread only."""

    def __init__(self, settings: ServerSettings, runtimes: Sequence[type[Runtime]]) -> None:
        self._settings = settings
        self._root = settings.model_repository
        self._runtimes = list(runtimes)
        self._models: dict[str, ModelEntry] = {}
        self._ready: dict[tuple[str, str], ServedModel] = {}
        self._latest: dict[str, ServedModel] = {}
        self._poll_task: asyncio.Task[None] | None = None
        self._closed = False
        #: shared by the models that enable response_cache (None: no --cache-config size)
        self.response_cache = (
            ResponseCache(settings.response_cache_bytes) if settings.response_cache_bytes else None
        )
        #: --model-load-thread-count: versions loading at once
        self._load_slots = asyncio.Semaphore(settings.flags.model_load_thread_count)
        #: --rate-limit=execution_count: shared by every model of the service (None: off)
        self.rate_limiter = RateLimiter.from_settings(settings)
        #: called (on the loop thread) after every change of what is served, e.g. to re-register
        self.on_change: Callable[[], None] | None = None

    # ---- requests -------------------------------------------------------------------------
    def get(self, name: str, version: str) -> ServedModel:
        """The READY version asked for (highest READY when ``version`` is empty)."""
        served = self._ready.get((name, version)) if version else self._latest.get(name)
        if served is not None:
            return served
        entry = self._models.get(name)
        if entry is None:
            raise UnknownModel(name)
        if not version:
            why = entry.reason or "; ".join(v.reason for v in entry.versions.values() if v.reason)
            raise Unavailable(f"model '{name}' has no ready version" + (f": {why}" if why else ""))
        try:
            number = int(version)
        except ValueError:
            raise InvalidArgument(f"model version must be an integer, got '{version}'") from None
        v = entry.versions.get(number)
        if v is None:
            raise NotFound(f"unknown version {number} of model '{name}'")
        raise Unavailable(
            f"model '{name}' version {number} is {v.state.value}"
            + (f": {v.reason}" if v.reason else "")
        )

    def ready_models(self) -> list[ServedModel]:
        return list(self._ready.values())

    def all_ready(self) -> bool:
        """Triton's strict readiness: every model tracked is (ModelEntry.strictly_ready)."""
        return all(entry.strictly_ready() for entry in self._models.values())

    def config_of(self, name: str, version: str) -> mc.ModelConfig:
        return self.get(name, version).config

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """RepositoryIndex: every model in the repository with its versions' states and reasons."""
        out: list[IndexEntry] = []
        names = set(self._models)
        if not ready_only and self._root.is_dir():
            with contextlib.suppress(OSError):
                found = repo.scan_repository(self._root)
                names |= {
                    n for n, d in found.items() if n in self._models or serves(self._runtimes, d)
                }
        for name in sorted(names):
            entry = self._models.get(name)
            if entry is None or not entry.versions:
                if not ready_only:
                    state = entry.state.value if entry else ""
                    out.append(IndexEntry(name, "", state, entry.reason if entry else ""))
                continue
            for number in sorted(entry.versions):
                v = entry.versions[number]
                if ready_only and v.state is not ModelState.READY:
                    continue
                out.append(IndexEntry(name, str(number), v.state.value, v.reason))
        return out

    # ---- start / stop ------------------------------------------------------------------------
    async def start(self) -> None:
        mode = self._settings.model_control_mode
        names: list[str] = []
        if mode in ("none", "poll"):
            names = sorted(repo.scan_repository(self._root))
        elif self._settings.startup_models:
            wanted = self._settings.startup_models
            names = sorted(repo.scan_repository(self._root)) if "*" in wanted else list(wanted)
        await asyncio.gather(*(self._load_quietly(n) for n in names))
        if mode == "poll":
            self._poll_task = asyncio.create_task(self._poll_loop(), name="repository-poll")

    async def close(self) -> None:
        """Stop polling, drain and unload every version."""
        self._closed = True
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        await asyncio.gather(
            *(self._unload(e, "server shutting down") for e in list(self._models.values()))
        )

    # ---- explicit control ----------------------------------------------------------------------
    async def load(
        self,
        name: str,
        override: mc.ModelConfig | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        """RepositoryModelLoad: (re)load ``name``; raises with the reason if no version loads."""
        if self._settings.model_control_mode == "none":
            raise Unavailable(
                "explicit model load/unload is not allowed when model control mode is 'none'"
            )
        repo.check_model_name(name)
        await self._load(name, override, files)
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(
                f"model '{name}' belongs to another framework family; this service serves "
                f"{', '.join(rt.backend for rt in self._runtimes)} models"
            )
        if not any(v.state is ModelState.READY for v in entry.versions.values()):
            reasons = entry.reason or "; ".join(
                f"version {n}: {v.reason}" for n, v in entry.versions.items()
            )
            raise ModelLoadError(
                f"failed to load model '{name}': {reasons or 'no version to load'}"
            )

    async def unload(self, name: str) -> None:
        if self._settings.model_control_mode == "none":
            raise Unavailable(
                "explicit model load/unload is not allowed when model control mode is 'none'"
            )
        repo.check_model_name(name)
        entry = self._models.get(name)
        if entry is None:
            if name not in repo.scan_repository(self._root):
                raise NotFound(f"unknown model '{name}'")
            return
        await self._unload(entry, UNLOADED)

    # ---- internals ------------------------------------------------------------------------------
    async def _load_quietly(self, name: str) -> None:
        try:
            await self._load(name, None, None)
        except ServingError as err:
            log.error("model %r: %s", name, err.message)

    async def _load(
        self, name: str, override: mc.ModelConfig | None, files: Mapping[str, bytes] | None
    ) -> None:
        entry = self._models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            path = self._root / name
            temp: Path | None = None
            if files:
                temp = repo.write_override_files(path, files)
                path = temp
            try:
                await self._load_locked(entry, path, override)
            finally:
                if temp is not None and not any(v.served for v in entry.versions.values()):
                    shutil.rmtree(temp, ignore_errors=True)

    async def _load_locked(
        self, entry: ModelEntry, path: Path, override: mc.ModelConfig | None
    ) -> None:
        name = entry.name
        if not path.is_dir():  # noqa: ASYNC240 - one stat on the control path
            if not entry.versions:
                del self._models[name]
            raise NotFound(f"unknown model '{name}': no folder {path}")
        fingerprint = repo.fingerprint(path)
        try:
            model_dir = repo.scan_model(path)
            prepared = prepare_config(
                self._runtimes,
                name,
                model_dir,
                override,
                auto_complete=self._settings.auto_complete_config,
                default_max_batch_size=self._settings.flags.default_max_batch_size,
            )
        except ServingError as err:
            entry.state, entry.reason = ModelState.UNAVAILABLE, err.message
            entry.fingerprint = fingerprint
            log.error("model %r failed to load: %s", name, err.message)
            if not entry.versions:
                entry.versions = {}
            return
        if prepared is None:
            self._models.pop(name, None)
            log.info("model %r is served by another framework family; skipped", name)
            return
        config, runtime = prepared
        config_changed = entry.config is None or entry.config != config
        wanted = repo.select_versions(config.version_policy, model_dir.versions)
        if not wanted:
            entry.state, entry.reason = (
                ModelState.UNAVAILABLE,
                "no version folder matches the version policy",
            )
        new_versions: dict[int, VersionEntry] = {}
        for number in wanted:
            vpath = model_dir.versions[number]
            vfp = repo.version_fingerprint(vpath)
            old = entry.versions.get(number)
            if (
                old is not None
                and old.served is not None
                and not config_changed
                and old.fingerprint == vfp
            ):
                new_versions[number] = old
                continue
            new_versions[number] = await self._load_version(
                config, number, vpath, runtime, vfp, old
            )
        retired = [
            v
            for n, v in entry.versions.items()
            if v.served is not None and new_versions.get(n) is not v
        ]
        entry.config, entry.versions, entry.fingerprint = config, new_versions, fingerprint
        if any(v.state is ModelState.READY for v in new_versions.values()):
            entry.state, entry.reason = ModelState.READY, ""
        self._publish()
        for v in retired:
            assert v.served is not None
            await v.served.close()
            log.info("model %r version %d retired", name, v.version)

    async def _load_version(
        self,
        config: mc.ModelConfig,
        number: int,
        vpath: Path,
        runtime: type[Runtime],
        vfp: object,
        old: VersionEntry | None,
    ) -> VersionEntry:
        log.info("model %r version %d: loading with %s", config.name, number, runtime.__name__)
        try:
            served = await self._load_served(config, number, vpath, runtime)
        except Exception as exc:
            reason = (
                exc.message if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"
            )
            log.error("model %r version %d failed to load: %s", config.name, number, reason)
            if old is not None and old.served is not None:
                old.reason = f"reload failed, still serving the previous load: {reason}"
                return old
            return VersionEntry(number, ModelState.UNAVAILABLE, reason, None, vfp)
        if config.response_cache.enable and self.response_cache is None:
            log.warning(
                "model %r version %d: response_cache is enabled but this service has no cache;"
                " every request runs (start it with --cache-config local,size=BYTES)",
                config.name,
                number,
            )
        if self._settings.metrics_config.records:
            served.stats.attach_latency(LatencyRecorder(self._settings.metrics_config, config))
        log.info("model %r version %d: READY", config.name, number)
        return VersionEntry(number, ModelState.READY, "", served, vfp)

    async def _load_served(
        self, config: mc.ModelConfig, number: int, vpath: Path, runtime: type[Runtime]
    ) -> ServedModel:
        """``ServedModel.load`` with at most --model-load-thread-count loads at once, tried again
        up to --model-load-retry-count times when it fails (the last failure is raised)."""
        retries = self._settings.flags.model_load_retry_count
        async with self._load_slots:
            failures = 0
            while True:
                try:
                    return await ServedModel.load(
                        config, number, vpath, runtime, self.response_cache, self.rate_limiter
                    )
                except Exception as exc:
                    failures += 1
                    if failures > retries:
                        raise
                    log.warning(
                        "model %r version %d failed to load (%s); retry %d of %d",
                        config.name,
                        number,
                        exc,
                        failures,
                        retries,
                    )

    async def _unload(self, entry: ModelEntry, reason: str) -> None:
        async with entry.lock:
            for v in entry.versions.values():
                if v.served is not None:
                    v.state = ModelState.UNLOADING
            self._publish()
            for v in entry.versions.values():
                if v.served is not None:
                    await v.served.close()
                    v.served = None
                v.state, v.reason = ModelState.UNAVAILABLE, reason
            entry.state, entry.reason, entry.config, entry.fingerprint = (
                ModelState.UNAVAILABLE,
                reason,
                None,
                None,
            )
            self._publish()  # announce the final state (the registry shows the reason)
            log.info("model %r unloaded (%s)", entry.name, reason)

    def _publish(self) -> None:
        """Rebuild the request-path look-up tables from the entries (cheap; on changes only)."""
        ready: dict[tuple[str, str], ServedModel] = {}
        latest: dict[str, ServedModel] = {}
        for name, entry in self._models.items():
            for number in sorted(entry.versions):
                v = entry.versions[number]
                if v.state is ModelState.READY and v.served is not None:
                    ready[(name, str(number))] = v.served
                    latest[name] = v.served
        self._ready, self._latest = ready, latest
        if self.on_change is not None:
            self.on_change()

    async def poll_once(self) -> None:
        """One repository scan: load added/changed models, unload removed ones."""
        try:
            found = repo.scan_repository(self._root)
        except OSError as exc:
            log.error("cannot scan model repository %s: %s", self._root, exc)
            return
        for name in sorted(found):
            entry = self._models.get(name)
            if entry is None or entry.fingerprint != repo.fingerprint(found[name].path):
                await self._load_quietly(name)
        for name in [n for n in self._models if n not in found]:
            await self._unload(self._models[name], "removed from the repository")
            self._models.pop(name, None)
            self._publish()

    async def _poll_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._settings.repository_poll_secs)
            try:
                await self.poll_once()
            except Exception:
                log.exception("repository poll failed")
