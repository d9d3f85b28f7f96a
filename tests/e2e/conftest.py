"""The whole mesh on loopback for end-to-end tests: control plane, Envoy, services, all real.

``deploy.supervisor.Mesh`` runs on its own event loop in a background thread (``MeshHandle``), so
test bodies stay plain blocking code using tritonclient exactly as a user would. Extra services
(a second family of models, a second replica) are ``python -m services.onnx`` subprocesses
(``ServiceProcess``) pointed at the mesh's control port. Every port is a free loopback port, every
wait is bounded, and every fixture stops what it started in ``finally``.
Requests and load through the gateway (``simple_inputs``, ``Load``) are in tests/e2e/traffic.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deploy.supervisor import Mesh, MeshSettings, control_plane_command, service_argv
from gateway.launcher import GatewayError, find_envoy

log = logging.getLogger(__name__)
T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]


def _envoy_missing() -> str:
    try:
        find_envoy()
    except GatewayError as exc:
        return str(exc)
    return ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = _envoy_missing()
    if reason:
        for item in items:
            if "tests/e2e/" in str(item.path).replace(os.sep, "/"):
                item.add_marker(pytest.mark.skip(reason=f"no Envoy binary: {reason}"))


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], T], within_s: float, what: str, every_s: float = 0.1) -> T:
    """Poll ``condition`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {within_s} s")
        time.sleep(every_s)


# ---- repositories ----------------------------------------------------------------------------
def make_repository(
    example_repo: Path, dst: Path, models: Iterable[str], simple_versions: int = 1
) -> Path:
    """A repository with some of the example models; ``simple`` gets versions 1..N (copies of
    version 1) and ``version_policy: { all { } }`` when N > 1, so splits have versions to pick."""
    dst.mkdir(parents=True)
    for name in models:
        shutil.copytree(example_repo / name, dst / name)
    if "simple" in models and simple_versions > 1:
        for v in range(2, simple_versions + 1):
            shutil.copytree(dst / "simple" / "1", dst / "simple" / str(v))
        cfg = dst / "simple" / "config.pbtxt"
        cfg.write_text(cfg.read_text() + "version_policy: { all { } }\n")
    return dst


# ---- the mesh --------------------------------------------------------------------------------
class LoopThread:
    """An asyncio event loop running forever in a daemon thread; ``run`` submits a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="e2e-mesh", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class MeshHandle:
    """A started ``Mesh`` plus the blocking helpers the tests use (status, splits, restarts)."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self.mesh = Mesh(settings)
        self._loop = LoopThread()
        self._stopped = False

    # lifecycle
    def start(self) -> MeshHandle:
        self._loop.run(self.mesh.start(progress=log.info, ready_within_s=60), timeout=90)
        return self

    def stop(self) -> None:
        """Stop the mesh the way ``meshserve up`` does on Ctrl-C (a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._loop.run(self.mesh.stop(), timeout=60)
        except BaseException:
            log.exception("the mesh did not stop cleanly; killing what is left")
            self._kill_all()
        finally:
            self._loop.close()

    def _kill_all(self) -> None:
        procs = [self.mesh.control, *self.mesh.services.values()]
        pids = [p.pid for p in procs if p is not None and p.returncode is None]
        if self.mesh.gateway is not None and self.mesh.gateway.pid is not None:
            pids.append(self.mesh.gateway.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # addresses
    @property
    def grpc_url(self) -> str:
        return f"{self.settings.host}:{self.settings.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.settings.host}:{self.settings.http_port}"

    @property
    def admin_url(self) -> str:
        assert self.mesh.gateway is not None
        return self.mesh.gateway.admin_url

    # the control plane's API, through the gateway
    def status(self) -> dict[str, Any] | None:
        return self._loop.run(self.mesh.status(), timeout=10)

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://{self.http_url}/meshserve/v1/{path}", data=data, method=method
        )
        req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def set_split(self, model: str, weights: dict[str, int], within_s: float = 10) -> str:
        """PUT a split and wait until the gateway ACKed the snapshot that carries it."""
        code, doc = self.api("PUT", f"splits/{model}", {"weights": weights})
        assert code == 200, doc
        self.wait_acked(doc["snapshot_version"], within_s)
        return str(doc["snapshot_version"])

    def clear_split(self, model: str, within_s: float = 10) -> None:
        code, doc = self.api("DELETE", f"splits/{model}")
        assert code == 200, doc
        self.wait_acked(doc["snapshot_version"], within_s)

    def acked(self, version: str) -> bool:
        """Whether every gateway and in-mesh caller (route watch) ACKed snapshot ``version``."""
        doc = self.status()
        if doc is None or not doc["gateways"]:
            return False
        nodes = [*doc["gateways"].values(), *doc.get("callers", {}).values()]
        return all(t["acked_version"] == version for g in nodes for t in g.values())

    def wait_acked(self, version: str, within_s: float = 10) -> None:
        wait_for(lambda: self.acked(version), within_s, f"ACKs of snapshot {version}")

    def instance_ids(self) -> set[str]:
        doc = self.status()
        return {i["id"] for i in doc["instances"]} if doc is not None else set()

    # the control plane process
    def kill_control_plane(self) -> None:
        assert self.mesh.control is not None
        self._loop.run(self._kill(self.mesh.control), timeout=10)

    def restart_control_plane(self) -> None:
        """Start the control plane again with the supervisor's arguments (``mesh.stop`` stops it)."""
        self.mesh.control = self._loop.run(
            asyncio.create_subprocess_exec(*control_plane_command(self.settings, fresh=False)),
            timeout=10,
        )

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@contextlib.contextmanager
def up_mesh(repository: Path, tmp: Path, *flags: str) -> Iterator[MeshHandle]:
    """A mesh whose settings come from `meshserve up`'s own parser given ``flags`` (as a user's
    command line would), on free ports; stopped when the block ends."""
    from deploy.cli import build_parser, up_settings

    args = [
        *("up", "--model-repository", str(repository)),
        *(f"--grpc-port={free_port()}", f"--http-port={free_port()}"),
        *(f"--control-port={free_port()}", f"--metrics-port={free_port()}"),
        f"--policy-file={tmp / 'policy.json'}",
        *flags,
    ]
    handle = MeshHandle(up_settings(build_parser().parse_args(args)))
    try:
        yield handle.start()
    finally:
        handle.stop()


@contextlib.contextmanager
def running_mesh(
    repository: Path,
    tmp: Path,
    model_control_mode: str = "none",
    load_models: tuple[str, ...] = (),
    cache_config: tuple[str, ...] = (),
) -> Iterator[MeshHandle]:
    settings = MeshSettings(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        control_port=free_port(),
        metrics_port=free_port(),
        policy_file=tmp / "policy.json",
        model_control_mode=model_control_mode,
        load_models=load_models,
        cache_config=cache_config,
    )
    handle = MeshHandle(settings)
    try:
        yield handle.start()
    finally:
        handle.stop()


def add_cached_copy(repo: Path, model: str, name: str) -> None:
    """Model ``name`` in ``repo``: ``model``'s files, its config renamed, response cache on."""
    from google.protobuf import text_format

    from services.core.config import load_config_file

    copy = repo / name
    shutil.copytree(repo / model, copy, symlinks=True)
    config = load_config_file(copy / "config.pbtxt")
    config.name = name
    config.response_cache.enable = True
    (copy / "config.pbtxt").write_text(text_format.MessageToString(config))


def use_gpu(repo: Path, models: list[str]) -> None:
    """Give each of ``models`` in ``repo`` one KIND_GPU instance on GPU 0 instead of the
    instances its config lists (a service refuses to load it where there is no CUDA device)."""
    from google.protobuf import text_format

    from protos.gen.inference import model_config_pb2 as mc
    from services.core.config import load_config_file

    for model in models:
        path = repo / model / "config.pbtxt"
        config = load_config_file(path)
        del config.instance_group[:]
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=[0])
        path.write_text(text_format.MessageToString(config))


# ---- extra service processes -----------------------------------------------------------------
@dataclass
class ServiceProcess:
    """``python -m services.onnx`` as the mesh starts its own services (``service_argv``: the
    mesh's settings, registered with its control plane), over ``settings.repository``."""

    settings: MeshSettings
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def id(self) -> str:
        assert self.proc is not None
        return f"onnx-{socket.gethostname()}-{self.proc.pid}"

    def start(self) -> ServiceProcess:
        cmd = [*service_argv(self.settings, "onnx"), "--exit-timeout-secs", "5", *self.extra_args]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, mesh: MeshHandle, models: int, within_s: float = 60) -> None:
        """Until the mesh lists this instance with ``models`` READY versions."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log_tail()}")
            doc = mesh.status() or {"instances": []}
            mine = [i for i in doc["instances"] if i["id"] == self.id]
            return bool(mine) and sum(m["state"] == "READY" for m in mine[0]["models"]) >= models

        wait_for(ready, within_s, f"service {self.id} registered with {models} READY model(s)")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def running_service(
    repository: Path, mesh: MeshHandle, tmp: Path, models: int, extra_args: Iterable[str] = ()
) -> Iterator[ServiceProcess]:
    settings = replace(mesh.settings, repository=repository)
    service = ServiceProcess(settings, tmp / "service.log", list(extra_args))
    try:
        service.start().wait_ready(mesh, models)
        yield service
    finally:
        service.stop()
