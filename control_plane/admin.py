"""The mesh's own API (status, traffic splits) under /meshserve/v1 on the front's HTTP app.

Reached through the gateway like every other front path, so `meshserve status` and
`meshserve split` only need the gateway's HTTP port. A split takes effect through a new
snapshot at once and persists in the policy store.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web

from control_plane.policy import PolicyError

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


def status_document(plane: ControlPlane) -> dict[str, Any]:
    """What `meshserve status` shows: services and their models, splits, xDS state."""
    snapshot = plane.cache.current
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
            for i in plane.source.instances()
        ],
        "splits": {m: dict(p.weights) for m, p in sorted(plane.policies.all().items())},
        "snapshot_version": snapshot.version if snapshot is not None else "",
        "gateways": {
            node: {url.rsplit(".", 1)[-1]: asdict(st) for url, st in types.items()}
            for node, types in plane.ads.status().items()
        },
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
