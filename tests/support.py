"""Test support: run a real service (all listeners on 127.0.0.1 port 0) in a background thread,
or as its own process (``service_process``).

The server gets its own event loop in its own thread, so tests can use tritonclient's blocking
clients against it exactly as a user would. ``stop`` always runs the graceful shutdown.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from services.core.runtime import Runtime
from services.core.server import RunningServer, start_server
from services.core.settings import ServerSettings

T = TypeVar("T")


def settings_for(repo: Path, **overrides: Any) -> ServerSettings:
    base = ServerSettings(
        model_repository=repo, grpc_port=0, http_port=0, metrics_port=0, exit_timeout_secs=5
    )
    return replace(base, **overrides)


class ServerThread:
    def __init__(self, settings: ServerSettings, runtimes: Sequence[type[Runtime]]) -> None:
        self.settings = settings
        self.runtimes = runtimes
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="meshserve-test-server", daemon=True)
        self.running: RunningServer | None = None

    def start(self, timeout: float = 120) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.running = await start_server(self.settings, self.runtimes)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.running.stop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the server's loop (e.g. a repository poll) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, timeout: float = 30) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        """``with ServerThread(settings, runtimes) as server:`` starts it (if not yet started)
        and stops it when the block ends, however it ends."""
        if not self._thread.is_alive() and not self._ready.is_set():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def grpc_url(self) -> str:
        assert self.running is not None
        return f"127.0.0.1:{self.running.grpc_port}"

    @property
    def http_url(self) -> str:
        assert self.running is not None
        return f"127.0.0.1:{self.running.http_port}"

    @property
    def metrics_url(self) -> str:
        assert self.running is not None
        return f"http://127.0.0.1:{self.running.metrics_port}/metrics"


def batched_counts(
    grpc_url: str,
    model: str,
    one_call: Callable[[Any], None],
    *,
    threads: int = 16,
    per_thread: int = 8,
) -> tuple[int, int]:
    """Run ``one_call(client)`` ``per_thread`` times from each of ``threads`` threads (one
    tritonclient per thread); re-raise the first failure; return the model's (inferences,
    executions) added meanwhile, read from its statistics."""
    import threading

    import tritonclient.grpc as grpcclient

    def counts() -> tuple[int, int]:
        c = grpcclient.InferenceServerClient(grpc_url)
        try:
            stats = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
        finally:
            c.close()
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    before = counts()
    errors: list[BaseException] = []

    def worker() -> None:
        c = grpcclient.InferenceServerClient(grpc_url)
        try:
            for _ in range(per_thread):
                one_call(c)
        except BaseException as exc:
            errors.append(exc)
        finally:
            c.close()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    if errors:
        raise errors[0]
    after = counts()
    return after[0] - before[0], after[1] - before[1]


@contextmanager
def service_process(
    repo: Path, args: Sequence[str], env: Mapping[str, str], family: str = "onnx"
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``python -m services.<family>`` on ``repo`` (gRPC on port 0, no HTTP or metrics) with
    ``args``, once it says it is ready: (the process, its gRPC port). Killed at the end unless
    the test stopped it; its output is read up to "ready:" (then left in the pipe)."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", f"services.{family}", "--model-repository", str(repo)),
            *("--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", *args),
        ],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port, seen = 0, []
        for line in proc.stdout:  # "listening: gRPC 127.0.0.1:PORT, ..." then "ready: ..."
            seen.append(line)
            if "listening: gRPC" in line:
                port = int(line.split("listening: gRPC ")[1].split(",")[0].rsplit(":", 1)[1])
            if "ready:" in line:
                break
        assert port, "the service did not say where it listens:\n" + "".join(seen)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
