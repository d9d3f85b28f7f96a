"""The mesh's metrics on one port (:8002): every service's /metrics plus Envoy's stats.

Families from several services are merged (one HELP/TYPE each, as the exposition format
requires) and each sample gains a ``service`` label naming the instance it came from, so two
replicas of one model stay distinct series. Every family passes through, whatever its name (the
Triton ones, Envoy's, a Python model's custom metrics). Where services disagree, the text stays
valid: the first HELP text seen is kept; a service whose TYPE for a family differs from the first
one seen has its samples of that family left out; a sample that already carries a ``service``
label keeps it as ``exported_service`` (Prometheus' rule for a clashing target label).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(.*)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def merge_exposition(parts: list[tuple[str, str]]) -> str:
    """Merge ``(service id, exposition text)`` pairs into one valid exposition text."""
    headers: dict[str, dict[str, str]] = {}  # family -> {"HELP": line, "TYPE": line}
    samples: dict[str, list[str]] = {}
    order: list[str] = []

    def family_seen(name: str) -> dict[str, str]:
        if name not in headers:
            headers[name], samples[name] = {}, []
            order.append(name)
        return headers[name]

    for service, text in parts:
        family = ""
        conflicting: set[str] = set()  # families whose TYPE here is not the one kept
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split()[2]
                kept = family_seen(family).setdefault(line[2:6], line)
                if line.startswith("# TYPE ") and kept != line:
                    conflicting.add(family)
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            name, labels, value = m.groups()
            key = family if family and name.startswith(family) else name
            family_seen(key)
            if key in conflicting:
                continue
            samples[key].append(f"{name}{_with_service(labels or '', service)} {value}")
    out: list[str] = []
    for family in order:
        out.extend(headers[family].values())
        out.extend(samples[family])
    return "\n".join(out) + "\n"


def _with_service(labels: str, service: str) -> str:
    """``labels`` (``{...}`` or "") with ``service="<service>"`` first; one already there is
    renamed ``exported_service``."""
    if not service:
        return labels
    inner = labels[1:-1]
    pairs = [(m.group(1), m.group(2)) for m in _LABEL.finditer(inner)]
    if any(name == "service" for name, _ in pairs) and _LABEL.sub("", inner).strip() == "":
        inner = ",".join(
            f'{"exported_service" if name == "service" else name}="{value}"'
            for name, value in pairs
        )
    label = f'service="{service}"'
    return "{" + label + ("," + inner if inner else "") + "}"


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
