"""Served targets: where the benchmark sends its load.

A target is a named context manager that yields a gRPC `host:port` which is ready to serve the
benchmarked models, and cleans up after itself. `ServiceTarget` starts the ONNX service on free
ports; `ExistingTarget` uses a server somebody else runs. A later "through the gateway" scenario
is one more class here (start service + control plane + Envoy, yield Envoy's gRPC address) and one
more entry in the list `benchmarks.run` builds.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import tritonclient.grpc as grpcclient

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
    name: str = "service"
    ports: dict[str, int] = field(default_factory=dict)

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
            try:
                wait_ready(url, self.models, self.ready_timeout_s, process)
                yield url
            except TargetError as exc:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-20:]
                raise TargetError(f"{exc}\n--- {self.log_path} ---\n" + "\n".join(tail)) from exc
            finally:
                stop_process(process)


@dataclass
class ExistingTarget:
    """A server that is already running (`--url`): checked for readiness, never started."""

    url: str
    models: Sequence[str]
    ready_timeout_s: float = 10.0
    name: str = "server"

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Yield the URL once the server reports the models ready."""
        wait_ready(self.url, self.models, self.ready_timeout_s)
        yield self.url
