"""The mesh's own API (status, traffic splits, mirrors) under /meshserve/v1 on the front's HTTP app.

Reached through the gateway like every other front path, so `meshserve status`, `meshserve split`
and `meshserve mirror` only need the gateway's HTTP port. A split or mirror takes effect through a
new snapshot at once and persists in the policy store. Bad policies are refused with HTTP 400 and
``{"error": "<what to fix>"}``.

    PUT|POST /meshserve/v1/splits/<model>   {"weights": {"1": 90, "2": 10}}
    DELETE   /meshserve/v1/splits/<model>
    PUT|POST /meshserve/v1/mirrors/<model>  {"version": "2", "percent": 12.5}
    DELETE   /meshserve/v1/mirrors/<model>
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web

from control_plane.mirror import mirror_status
from control_plane.policy import PolicyError
from control_plane.translate import ready_replicas
from services.core.route_watch import CALLER_NODE_PREFIX

if TYPE_CHECKING:
    from control_plane.app import ControlPlane

_PLANE: web.AppKey[ControlPlane] = web.AppKey("meshserve-control-plane")
PREFIX = "/meshserve/v1"


def add_admin_routes(app: web.Application, plane: ControlPlane) -> None:
    app[_PLANE] = plane
    app.router.add_get(f"{PREFIX}/status", _status)
    app.router.add_put(f"{PREFIX}/splits/{{model}}", _set_split)
    app.router.add_post(f"{PREFIX}/splits/{{model}}", _set_split)
    app.router.add_delete(f"{PREFIX}/splits/{{model}}", _clear_split)
    app.router.add_put(f"{PREFIX}/mirrors/{{model}}", _set_mirror)
    app.router.add_post(f"{PREFIX}/mirrors/{{model}}", _set_mirror)
    app.router.add_delete(f"{PREFIX}/mirrors/{{model}}", _clear_mirror)


def status_document(plane: ControlPlane) -> dict[str, Any]:
    """What `meshserve status` shows: services and their models, splits, mirrors (active or why
    not), xDS state."""
    snapshot = plane.cache.current
    instances = plane.source.instances()
    ready = set(ready_replicas(instances))
    policies = sorted(plane.policies.all().items())
    nodes = {
        node: {url.rsplit(".", 1)[-1]: asdict(st) for url, st in types.items()}
        for node, types in plane.ads.status().items()
    }
    return {
        "instances": [
            {
                "id": i.id,
                "family": i.family,
                "address": f"{i.host}:{i.grpc_port}",
                "http_port": i.http_port,
                "metrics_port": i.metrics_port,
                "models": [asdict(m) for m in i.models],
            }
            for i in instances
        ],
        "splits": {m: dict(p.weights) for m, p in policies if p.weights},
        "mirrors": {
            m: mirror_status(m, p.mirror, {v for name, v in ready if name == m})
            for m, p in policies
            if p.mirror is not None
        },
        "snapshot_version": snapshot.version if snapshot is not None else "",
        # False between a registration and the snapshot that routes to it
        "routes_current": plane.routes_current,
        # Envoy gateways, and in-mesh callers that route by the same routes (route_watch.py)
        "gateways": {n: t for n, t in nodes.items() if not n.startswith(CALLER_NODE_PREFIX)},
        "callers": {n: t for n, t in nodes.items() if n.startswith(CALLER_NODE_PREFIX)},
    }


async def _status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[_PLANE]))


async def _set_split(request: web.Request) -> web.Response:
    plane = request.app[_PLANE]
    model = request.match_info["model"]
    try:
        body = json.loads(await request.read() or b"{}")
        weights = body.get("weights") if isinstance(body, dict) else None
        if not isinstance(weights, dict):
            raise PolicyError('send {"weights": {"<version>": <weight>, ...}}')
        policy = plane.policies.set_split(model, weights)
    except (ValueError, PolicyError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    version = plane.publish()
    return web.json_response(
        {"model": model, "weights": dict(policy.weights), "snapshot_version": version}
    )


async def _clear_split(request: web.Request) -> web.Response:
    plane = request.app[_PLANE]
    plane.policies.clear_split(request.match_info["model"])
    return web.json_response(
        {"model": request.match_info["model"], "snapshot_version": plane.publish()}
    )


async def _set_mirror(request: web.Request) -> web.Response:
    plane = request.app[_PLANE]
    model = request.match_info["model"]
    try:
        body = json.loads(await request.read() or b"{}")
        if not isinstance(body, dict) or "version" not in body or "percent" not in body:
            raise PolicyError('send {"version": "<version>", "percent": <0 < p <= 100>}')
        mirror = plane.policies.set_mirror(model, body["version"], body["percent"])
    except (ValueError, PolicyError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    version = plane.publish()
    ready = {v for name, v in ready_replicas(plane.source.instances()) if name == model}
    return web.json_response(
        {"model": model, **mirror_status(model, mirror, ready), "snapshot_version": version}
    )


async def _clear_mirror(request: web.Request) -> web.Response:
    plane = request.app[_PLANE]
    plane.policies.clear_mirror(request.match_info["model"])
    return web.json_response(
        {"model": request.match_info["model"], "snapshot_version": plane.publish()}
    )
