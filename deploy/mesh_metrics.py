"""The mesh's metrics on one port (:8002): every service's /metrics plus Envoy's stats.

Families from several services are merged (one HELP/TYPE each, as the exposition format
requires) and each sample gains a ``service`` label naming the instance it came from, so two
replicas of one model stay distinct series.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(.*)$")


def merge_exposition(parts: list[tuple[str, str]]) -> str:
    """Merge ``(service id, exposition text)`` pairs into one valid exposition text."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    order: list[str] = []
    for service, text in parts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                if family not in headers:
                    headers[family], samples[family] = [], []
                    order.append(family)
                if line not in headers[family]:
                    headers[family].append(line)
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            name, labels, value = m.groups()
            key = family if family and name.startswith(family) else name
            if key not in samples:
                headers[key], samples[key] = [], []
                order.append(key)
            label = f'service="{service}"' if service else ""
            if labels and label:
                labels = "{" + label + "," + labels[1:]
            elif label:
                labels = "{" + label + "}"
            samples[key].append(f"{name}{labels or ''} {value}")
    out: list[str] = []
    for family in order:
        out.extend(headers[family])
        out.extend(samples[family])
    return "\n".join(out) + "\n"


StatusFn = Callable[[], Awaitable[dict[str, Any] | None]]


def mesh_metrics_app(status: StatusFn, envoy_admin: Callable[[], str | None]) -> web.Application:
    """GET /metrics: scrape every registered service and Envoy, merged."""

    async def fetch(session: aiohttp.ClientSession, url: str) -> str:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                return await r.text() if r.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError):
            return ""

    async def handle(_request: web.Request) -> web.Response:
        doc = await status() or {"instances": []}
        targets = [
            (i["id"], f"http://{i['address'].rsplit(':', 1)[0]}:{i['metrics_port']}/metrics")
            for i in doc["instances"]
            if i.get("metrics_port")
        ]
        admin = envoy_admin()
        if admin:
            targets.append(("", f"{admin}/stats/prometheus"))
        async with aiohttp.ClientSession() as session:
            texts = await asyncio.gather(*(fetch(session, url) for _, url in targets))
        body = merge_exposition([(sid, t) for (sid, _), t in zip(targets, texts, strict=True)])
        return web.Response(text=body, content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app
