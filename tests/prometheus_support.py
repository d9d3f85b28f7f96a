"""A real Prometheus (Debian's package) scraping our metrics endpoints in tests.

Prometheus refuses a scrape whose exposition text is malformed (a family declared twice,
samples outside their family, bad label syntax), so a target that stays "up" with no error and
queries that return our values prove the format, not just our own parser's view of it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus is not installed (.ci/run installs it)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=5) as r:
            return json.loads(r.read())["data"]

    def wait_value(self, query: str, expected: float, within_s: float = 30) -> float:
        """Poll an instant query until its (summed) value equals ``expected``."""
        deadline = time.monotonic() + within_s
        last: float | None = None
        while time.monotonic() < deadline:
            result = self.api("/api/v1/query", query=f"sum({query})")["result"]
            if result:
                last = float(result[0]["value"][1])
                if last == expected:
                    return last
            time.sleep(0.3)
        raise AssertionError(f"{query}: expected {expected}, last seen {last}")

    def targets_healthy(self, within_s: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + within_s
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            targets = self.api("/api/v1/targets")["activeTargets"]
            if targets and all(t["health"] == "up" for t in targets):
                return targets
            time.sleep(0.3)
        raise AssertionError(
            f"targets not healthy: {[(t['health'], t['lastError']) for t in targets]}"
        )


@contextmanager
def prometheus_scraping(targets: list[str], workdir: Path) -> Iterator[Prometheus]:
    """Start Prometheus scraping ``targets`` (host:port, /metrics) every second; always stop it."""
    assert PROMETHEUS is not None
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: meshserve\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    port = _free_port()
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        server = Prometheus(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{server.url}/-/ready", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"prometheus did not start: {err[-2000:]}") from None
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
