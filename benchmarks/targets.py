"""Served targets: where the benchmark sends its load.

A target is a named context manager that yields a gRPC `host:port` which is ready to serve the
benchmarked models, and cleans up after itself. `ServiceTarget` starts the ONNX service on free
ports and is hit directly; `GatewayTarget` starts the whole mesh (control plane, Envoy gateway,
services) with `deploy.supervisor.Mesh` on free ports and yields Envoy's gRPC address;
`ExistingTarget` uses a server somebody else runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import tritonclient.grpc as grpcclient

from benchmarks.cpu import Processes
from deploy.supervisor import Mesh, MeshSettings

_T = TypeVar("_T")

DEFAULT_SERVICE_CMD = (
    "{python} -m services.onnx --model-repository {repository} "
    "--grpc-port {grpc_port} --http-port {http_port} --metrics-port {metrics_port}"
)


class Target(Protocol):
    """A served scenario: `name` labels its rows; `serve()` yields a ready gRPC address."""

    name: str

    def serve(self) -> contextlib.AbstractContextManager[str]:
        """Make the target ready, yield its gRPC `host:port`, and clean up on exit."""
        ...

    def server_processes(self) -> Processes | None:
        """While serving: the processes (and threads of this process) whose CPU time is the
        server's; None when unknown."""
        ...


class TargetError(RuntimeError):
    """The target could not be started or never became ready."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ready(url: str, models: Sequence[str]) -> bool:
    client = grpcclient.InferenceServerClient(url)
    try:
        return bool(client.is_server_ready()) and all(client.is_model_ready(m) for m in models)
    except Exception:  # not listening yet, or not ready: both mean "try again"
        return False
    finally:
        client.close()


def wait_ready(
    url: str,
    models: Sequence[str],
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll gRPC ServerReady and ModelReady until true; fail early if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise TargetError(f"server exited with status {process.returncode} before ready")
        if _ready(url, models):
            return
        time.sleep(0.25)
    raise TargetError(f"{url} not ready for {', '.join(models)} within {timeout_s:.0f} s")


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process we started, then SIGKILL it if it outlives the grace period."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class ServiceTarget:
    """Starts a framework service (the ONNX one by default) and benchmarks it directly."""

    repository: Path
    models: Sequence[str]
    log_path: Path
    command_template: str = DEFAULT_SERVICE_CMD
    ready_timeout_s: float = 180.0
    name: str = "direct"
    ports: dict[str, int] = field(default_factory=dict)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def server_processes(self) -> Processes | None:
        """The service process (with its threads and any children) while it runs."""
        if self._process is None or self._process.poll() is not None:
            return None
        return Processes(pids=(self._process.pid,))

    def command(self) -> list[str]:
        """The service command line with free ports filled in."""
        self.ports = {k: free_port() for k in ("grpc_port", "http_port", "metrics_port")}
        text = self.command_template.format(
            python=shlex.quote(sys.executable),
            repository=shlex.quote(str(self.repository)),
            **self.ports,
        )
        return shlex.split(text)

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Start the service, wait for readiness, yield its gRPC address, always stop it."""
        command = self.command()
        url = f"127.0.0.1:{self.ports['grpc_port']}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"  starting {self.name}: {shlex.join(command)} (log: {self.log_path})")
        with self.log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            self._process = process
            try:
                wait_ready(url, self.models, self.ready_timeout_s, process)
                yield url
            except TargetError as exc:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-20:]
                raise TargetError(f"{exc}\n--- {self.log_path} ---\n" + "\n".join(tail)) from exc
            finally:
                self._process = None
                stop_process(process)


class _LoopThread:
    """An asyncio event loop running in a daemon thread for as long as the mesh lives.

    `Mesh` owns asyncio subprocesses and a task that reads Envoy's stderr, so its loop must keep
    running while perf_analyzer (a blocking subprocess in the main thread) drives the load.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mesh-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` on the loop and wait for it; cancel it if the wait is interrupted."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        """Stop the loop, join its thread and close it."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        if not self.thread.is_alive():
            self.loop.close()


@contextlib.contextmanager
def _output_to(log: BinaryIO) -> Iterator[None]:
    """Point file descriptors 1 and 2 at `log` while children are spawned (they inherit them).

    `Mesh` starts the control plane and the services with this process's stdout/stderr; without
    this their logs would interleave with the benchmark's progress lines.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def _loggers_to(path: Path, names: Sequence[str]) -> Iterator[None]:
    """Send the named loggers (Envoy's stderr goes through `gateway.launcher`) to `path` only."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved: list[tuple[logging.Logger, bool, int]] = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, logger.level))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, propagate, level in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
            logger.setLevel(level)
        handler.close()


@dataclass
class GatewayTarget:
    """The whole mesh (`deploy.supervisor.Mesh`) on free ports; load goes through Envoy's gRPC port.

    Control plane, Envoy and one service per framework family in `repository` run as children of
    this process (their output and Envoy's log lines go to `log_path`); `serve()` always stops them
    (services drain and deregister first, then Envoy, then the control plane).
    """

    repository: Path
    models: Sequence[str]
    log_path: Path
    ready_timeout_s: float = 180.0
    name: str = "gateway"
    ports: dict[str, int] = field(default_factory=dict)
    _running: tuple[Mesh, _LoopThread] | None = field(default=None, init=False, repr=False)

    def server_processes(self) -> Processes | None:
        """While serving: the control plane, Envoy and the services (with their threads and
        children), and this process's thread that runs the mesh's event loop (it reads Envoy's
        log)."""
        if self._running is None:
            return None
        mesh, runner = self._running
        pids = [mesh.control.pid if mesh.control is not None else None]
        pids.append(mesh.gateway.pid if mesh.gateway is not None else None)
        pids += [p.pid for p in mesh.services.values()]
        threads = (runner.thread.native_id,)
        return Processes(
            pids=tuple(p for p in pids if p is not None),
            threads=tuple(t for t in threads if t is not None),
        )

    def settings(self) -> MeshSettings:
        """Mesh settings with free gateway gRPC/HTTP and control-plane ports, no metrics port."""
        self.ports = {k: free_port() for k in ("grpc_port", "http_port", "control_port")}
        return MeshSettings(
            repository=self.repository,
            host="127.0.0.1",
            grpc_port=self.ports["grpc_port"],
            http_port=self.ports["http_port"],
            control_port=self.ports["control_port"],
            metrics_port=-1,  # the mesh-wide metrics server is not measured; 8002 may be taken
        )

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Start the mesh, wait until the models answer through Envoy, yield its gRPC address."""
        settings = self.settings()
        url = f"{settings.host}:{settings.grpc_port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        print(
            f"  starting {self.name}: mesh with gateway gRPC {url}, HTTP {settings.http_port}, "
            f"control {settings.control_port} (log: {self.log_path})"
        )
        names = ("gateway", "deploy", "control_plane")
        with self.log_path.open("ab") as log, _loggers_to(self.log_path, names):
            mesh = Mesh(settings)
            runner = _LoopThread()

            def progress(line: str) -> None:
                logging.getLogger("deploy.supervisor").info("mesh: %s", line)

            try:
                try:
                    with _output_to(log):
                        runner.run(mesh.start(progress, self.ready_timeout_s))
                    wait_ready(url, self.models, 30.0)
                    self._running = (mesh, runner)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    tail = self.log_path.read_text(errors="replace").strip().splitlines()[-20:]
                    raise TargetError(
                        f"mesh not ready: {exc}\n--- {self.log_path} ---\n" + "\n".join(tail)
                    ) from exc
                yield url
            finally:
                self._running = None
                try:
                    runner.run(mesh.stop())
                finally:
                    runner.close()


@dataclass
class ExistingTarget:
    """A server that is already running (`--url`): checked for readiness, never started."""

    url: str
    models: Sequence[str]
    ready_timeout_s: float = 10.0
    name: str = "server"

    def server_processes(self) -> Processes | None:
        """Unknown: somebody else runs this server."""
        return None

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Yield the URL once the server reports the models ready."""
        wait_ready(self.url, self.models, self.ready_timeout_s)
        yield self.url
