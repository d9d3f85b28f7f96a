"""gRPC through grpc_front: a C++ process owns the port, this module runs the calls.

grpc.aio spends about 0.2 ms of CPU per call here, most of it in its own machinery; with the
front, gRPC runs in C++ and each call reaches Python as one frame on a Unix socket
(front_link.py, native/PROTOCOL.md). ``NativeFront`` takes the same handler tables as a
``grpc.aio.Server`` (``add_generic_rpc_handlers``, ``add_registered_method_handlers``), so the
generated ``add_*Servicer_to_server`` functions work unchanged, and runs each handler with a
``FrontContext`` that answers what our servicers ask of a ``grpc.aio.ServicerContext``.

The front also makes the service's outbound unary calls: ``NativeFront.caller`` (front_calls.py).
Other services on this host may skip both fronts and call the handlers over a local link
(``NativeFront.links``, local_links.py). The calls of each link are run by a ``CallRunner``
(call_runner.py).

``front_binary()`` finds the front (built by ``make native``); server.py falls back to grpc.aio
where it is not built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from services.core.call_runner import CallRunner
from services.core.front_calls import FrontCaller, clear_current_caller, set_current_caller
from services.core.front_link import CallStart, FrameLink, Metadata, OutResult, encode_shutdown
from services.core.local_links import LinkServer

log = logging.getLogger(__name__)

#: where ``make native`` puts the front; MESHSERVE_GRPC_FRONT overrides
DEFAULT_BINARY = Path(__file__).parent / "native" / "build" / "grpc_front"


def front_binary() -> Path | None:
    """The grpc_front executable, or None where it is not built."""
    path = Path(os.environ.get("MESHSERVE_GRPC_FRONT", "") or DEFAULT_BINARY)
    return path if path.is_file() and os.access(path, os.X_OK) else None


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str, metadata: Metadata) -> None:
        self.method = method
        self.invocation_metadata = metadata


class NativeFront:
    """A gRPC server made of a grpc_front process and the handlers run here."""

    def __init__(self, binary: Path, max_message_bytes: int) -> None:
        self._binary = binary
        self._max_message_bytes = max_message_bytes
        self._generic: list[grpc.GenericRpcHandler[Any, Any]] = []
        self._methods: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}
        self._runner = CallRunner(self.handler, self._send)
        self._link: FrameLink | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._server: asyncio.AbstractServer | None = None
        self._folder = ""
        self._drained: asyncio.Event = asyncio.Event()
        self.port = 0
        #: outbound unary calls through this front (usable once started, failing once stopped)
        self.caller = FrontCaller()
        #: other local services' links straight to these handlers (local_links.py)
        self.links = LinkServer(self.handler, max_message_bytes)
        #: set when the front's link is gone (the front exited or was stopped)
        self.closed: asyncio.Event = asyncio.Event()

    # ---- the grpc.aio.Server surface the generated code uses -------------------------------------
    def add_generic_rpc_handlers(
        self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        for name, handler in handlers.items():
            self._methods[f"/{service}/{name}"] = handler

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Start the front on host:port (0: any free port); returns the bound port."""
        loop = asyncio.get_running_loop()
        self._folder = tempfile.mkdtemp(prefix="meshserve-front-")
        path = str(Path(self._folder) / "link.sock")
        link = FrameLink(self)
        self._server = await loop.create_unix_server(lambda: link, path)
        streaming = [m for m, h in self._all_methods() if h.request_streaming]
        args = [
            str(self._binary),
            "--listen",
            f"{host}:{port}",
            "--backend",
            path,
            "--max-message-bytes",
            str(self._max_message_bytes),
        ]
        for method in streaming:
            args += ["--streaming-request", method]
        self._process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line.startswith(b"listening "):
            code = await self._process.wait()
            self._cleanup_folder()
            raise OSError(f"cannot bind gRPC port {host}:{port} (grpc_front exited {code})")
        await link.connected
        self._link = link
        self.caller.attach(link.send)
        set_current_caller(self.caller)
        self.port = int(line.split()[1])
        await self.links.start(host, self.port)
        log.info("gRPC front %s serving %s:%d", self._binary.name, host, self.port)
        return self.port

    async def stop(self, grace: float | None) -> None:
        """Stop taking calls; calls in flight get ``grace`` seconds, then are cancelled."""
        grace = 0.0 if grace is None else grace
        deadline = time.monotonic() + grace
        self.links.refuse_calls()
        if self._link is not None and not self.closed.is_set():
            self._link.send(encode_shutdown(int(grace * 1000)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace + 5.0)
        await self.links.stop(max(0.0, deadline - time.monotonic()))
        self._runner.stop_all()
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), 5.0)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._link is not None:
            self._link.close()
        # only now: the calls still finishing during the grace period may call out
        clear_current_caller(self.caller)
        self.caller.close("the gRPC front is stopped")
        if self._server is not None:
            self._server.close()
        self._cleanup_folder()

    def _cleanup_folder(self) -> None:
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = ""

    # ---- frames from the front (front_link.FrameSink) ------------------------------------------
    def on_call(self, start: CallStart) -> None:
        self._runner.on_call(start)

    def on_message(self, call_id: int, payload: bytes | memoryview) -> None:
        self._runner.on_message(call_id, payload)

    def on_half_close(self, call_id: int) -> None:
        self._runner.on_half_close(call_id)

    def on_cancel(self, call_id: int) -> None:
        self._runner.on_cancel(call_id)

    def on_drained(self) -> None:
        self._drained.set()

    def on_out_result(self, result: OutResult) -> None:
        self.caller.on_result(result)

    def on_link_lost(self, exc: Exception | None) -> None:
        if not self.closed.is_set():
            if not self._drained.is_set():
                log.error("gRPC front link lost (%s): gRPC calls are no longer served", exc)
            self.closed.set()
        self.caller.close(f"the gRPC front is gone (link lost: {exc or 'closed'})")
        self._runner.cancel_all()
        self.links.refuse_calls()  # the port is gone: callers must not find this service here

    @property
    def in_flight(self) -> int:
        """Calls the front brought that are still running."""
        return self._runner.in_flight

    # ---- handlers ------------------------------------------------------------------------------
    def _all_methods(self) -> list[tuple[str, grpc.RpcMethodHandler[Any, Any]]]:
        return [(m, h) for m, h in self._methods.items() if h is not None]

    def handler(self, method: str, metadata: Metadata) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler that serves ``method`` (None: unimplemented)."""
        try:
            return self._methods[method]
        except KeyError:
            pass
        found = None
        for generic in self._generic:
            found = generic.service(_CallDetails(method, metadata))
            if found is not None:
                break
        self._methods[method] = found
        return found

    def _send(self, frame: bytes) -> None:
        if self._link is not None:
            self._link.send(frame)
