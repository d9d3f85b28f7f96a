"""The control plane's front over HTTP/REST v2: the REST twin of ``front.py``.

Where it sits: Envoy routes REST requests by path (``/v2/models/<name>[/versions/<v>]/…``) to
the model's services; everything else, and a model path it could not route, reaches this app.
Registry look-ups, owners, merging and readiness come from ``front_core.Front`` (decisions are
documented there); requests are forwarded to the services' own REST endpoints (``http_port``):

* health, ``GET /v2`` (metadata), ``POST /v2/repository/index`` (merged) and statistics
  (``GET /v2/models/stats`` and a model's ``…/stats``, merged over replicas) answered here;
* ``POST /v2/repository/models/<m>/load|unload``: the body forwarded to every owner; all must
  succeed, else the first failing service's answer is returned as it is;
* ``/v2/systemsharedmemory/…``, ``/v2/cudasharedmemory/…``, ``/v2/logging``,
  ``/v2/trace/setting``, ``/v2/models/<m>/trace/setting``: made on every registered service,
  answered with the first one's
  (system regions and settings updates also on services that join later);
* any other ``/v2/models/<m>…`` of a known model: proxied to one of its instances, the body
  streamed both ways. aiohttp has already decompressed a request sent with Content-Encoding, so
  it goes on uncompressed (without Content-Encoding and Content-Length); the service's answer
  passes through as it is (Content-Encoding, Inference-Header-Content-Length kept). An unknown
  model is 404 ``{"error": "unknown model '<m>'"}``; its ``…/ready`` is 400, as not ready.

Errors are translated in one place (``_errors``): a FrontError becomes ``{"error": message}``
with its HTTP status; aiohttp's HTTP errors keep their status; anything else is logged and
answered 500 with a generic message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

import aiohttp
import grpc
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from control_plane.front_core import Front
from control_plane.front_errors import FrontError
from control_plane.model import MeshState, ServiceInstance
from services.core.http_json import message_to_json, unreadable_body

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: tritonclient sends whole tensors in one body; allow what gRPC allows (INT32_MAX bytes)
MAX_BODY_BYTES = 2**31 - 1
_CHUNK = 1 << 16
#: headers that belong to one hop (RFC 9110 §7.6.1) or that aiohttp sets itself
_HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Server", "Date",
    )
)  # fmt: skip

#: the HTTP twin of each gRPC status the front answers with (others: 500)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_FRONT: web.AppKey[Front] = web.AppKey("front", Front)
_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def build_front_app(
    state_provider: Callable[[], MeshState], *, front: Front | None = None
) -> web.Application:
    """The front's aiohttp application (run it with AppRunner). ``front`` shares one Front (and
    its channels) with the gRPC servicer; without it the app makes its own over
    ``state_provider`` and closes it on cleanup."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app[_FRONT] = front if front is not None else Front(state_provider)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        # auto_decompress off: a compressed answer passes through with its Content-Encoding
        app[_SESSION] = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        try:
            yield
        finally:
            await app[_SESSION].close()
            if front is None:
                await app[_FRONT].close()

    app.cleanup_ctx.append(lifetime)
    r = app.router
    r.add_get("/v2/health/live", _live)
    r.add_get("/v2/health/ready", _ready)
    r.add_get("/v2", _metadata)
    r.add_post("/v2/repository/index", _index)
    r.add_post("/v2/repository/models/{model}/load", _control)
    r.add_post("/v2/repository/models/{model}/unload", _control)
    r.add_get("/v2/models/stats", _statistics)
    r.add_get("/v2/models/{model}/stats", _statistics)
    r.add_get("/v2/models/{model}/versions/{version}/stats", _statistics)
    r.add_route("*", "/v2/models/{model}/trace/setting", _settings)
    r.add_route("*", "/v2/models/{model}", _model)
    r.add_route("*", "/v2/models/{model}/{tail:.*}", _model)
    r.add_route("*", "/v2/systemsharedmemory/{tail:.*}", _system_shared_memory)
    r.add_route("*", "/v2/cudasharedmemory/{tail:.*}", _everywhere)
    r.add_route("*", "/v2/logging", _settings)
    r.add_route("*", "/v2/trace/setting", _trace_setting)
    return app


# ---- the one place errors are translated -------------------------------------------------------
@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except FrontError as exc:
        return _error(HTTP_STATUS.get(exc.code, 500), exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, f"{exc.reason}: {request.method} {request.path}")
    except web.RequestPayloadError as exc:
        return unreadable_body(request, exc)
    except Exception:
        log.exception("front HTTP %s %s failed", request.method, request.path)
        return _error(500, f"internal error in {request.method} {request.path}; see the server log")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _unavailable(inst: ServiceInstance, exc: BaseException) -> FrontError:
    return FrontError(
        grpc.StatusCode.UNAVAILABLE,
        f"service '{inst.id}' ({inst.host}:{inst.http_port}) did not answer: {exc or type(exc)}",
    )


# ---- answered here -------------------------------------------------------------------------
def _status_only(ok: bool) -> web.Response:
    return web.Response(status=200 if ok else 400)  # as Triton: empty body, 200 yes, 400 no


async def _live(request: web.Request) -> web.Response:
    return _status_only(request.app[_FRONT].live())


async def _ready(request: web.Request) -> web.Response:
    return _status_only(request.app[_FRONT].ready())


async def _metadata(request: web.Request) -> web.Response:
    return web.json_response(message_to_json(await request.app[_FRONT].metadata()))


async def _index(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        doc = json.loads(body) if body else {}
    except ValueError as exc:
        raise FrontError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"malformed JSON in the repository index request: {exc}",
        ) from None
    ready = doc.get("ready", False) if isinstance(doc, dict) else None
    if not isinstance(ready, bool):
        raise FrontError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the repository index request must be a JSON object whose 'ready' is true or false",
        )
    entries = []
    for m in (await request.app[_FRONT].repository_index(ready)).models:
        entry = {"name": m.name}
        if m.version:
            entry["version"] = m.version
        entry["state"] = m.state
        if m.reason:
            entry["reason"] = m.reason
        entries.append(entry)
    return web.json_response(entries)


async def _statistics(request: web.Request) -> web.Response:
    front = request.app[_FRONT]
    name = request.match_info.get("model", "")
    version = request.match_info.get("version", "")
    stats = await front.statistics(name, version, front.fanout_timeout)
    return web.json_response(message_to_json(stats))


# ---- forwarded ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Answer:
    """A service's buffered answer to a forwarded request."""

    status: int
    body: bytes
    content_type: str

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type=self.content_type)


def _forward_headers(request: web.Request) -> CIMultiDict[str]:
    headers = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS
    )
    if "Content-Encoding" in headers:  # aiohttp decompressed the body already
        headers.popall("Content-Encoding")
        headers.popall("Content-Length", None)
    return headers


def _url(inst: ServiceInstance, request: web.Request) -> URL:
    return URL(f"http://{inst.host}:{inst.http_port}{request.raw_path}", encoded=True)


async def _send(
    request: web.Request, inst: ServiceInstance, body: bytes, seconds: float | None
) -> _Answer:
    try:
        async with request.app[_SESSION].request(
            request.method,
            _url(inst, request),
            headers=_forward_headers(request),
            data=body,
            timeout=aiohttp.ClientTimeout(total=seconds),
        ) as upstream:
            return _Answer(upstream.status, await upstream.read(), upstream.content_type)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _unavailable(inst, exc) from None


async def _send_all(
    request: web.Request, instances: Sequence[ServiceInstance], seconds: float | None
) -> web.Response:
    """The request on every instance; the first failing answer, or else the first answer."""
    if not instances:
        raise FrontError(grpc.StatusCode.UNAVAILABLE, "no service is registered")
    body = await request.read()
    answers = await asyncio.gather(*(_send(request, i, body, seconds) for i in instances))
    failed = [a for a in answers if a.status >= 300]
    return (failed or answers)[0].response()


async def _control(request: web.Request) -> web.Response:
    owners = await request.app[_FRONT].owners(request.match_info["model"])
    return await _send_all(request, owners, None)  # loads take as long as they take


async def _everywhere(request: web.Request) -> web.Response:
    front = request.app[_FRONT]
    return await _send_all(request, front.state().instances, front.fanout_timeout)


async def _system_shared_memory(request: web.Request) -> web.Response:
    """Made on every service; registrations are also booked for services that join later."""
    front = request.app[_FRONT]
    instances = front.state().instances
    response = await _send_all(request, instances, front.fanout_timeout)
    front.regions.rest_call(
        request.method, request.path, await request.read(), response.status, instances
    )
    return response


async def _settings(request: web.Request) -> web.Response:
    """Log and trace settings (global or a model's): made on every service; an update all
    accepted is booked
    for the services that join later (shared_settings.py), under the book's lock."""
    if request.method != "POST":
        return await _everywhere(request)
    front = request.app[_FRONT]
    book = front.shared_settings
    async with book.lock:
        instances = front.state().instances
        response = await _send_all(request, instances, front.fanout_timeout)
        book.rest_call(request.path, await request.read(), response.status, instances)
    return response


async def _trace_setting(request: web.Request) -> web.Response:
    """Global trace settings (``_settings``); an update also reaches the gateway's own sampling
    (``Front.on_global_trace_settings``)."""
    response = await _settings(request)
    if request.method == "POST" and response.status == 200 and response.body is not None:
        try:
            doc = json.loads(bytes(cast(bytes, response.body)))
        except ValueError:
            return response
        if isinstance(doc, dict):
            request.app[_FRONT].global_trace_settings_changed(
                {
                    k: [str(x) for x in v] if isinstance(v, list) else [str(v)]
                    for k, v in doc.items()
                }
            )
    return response


async def _model(request: web.Request) -> web.StreamResponse:
    name, tail = request.match_info["model"], request.match_info.get("tail", "")
    parts = tail.split("/")
    version = parts[1] if len(parts) >= 2 and parts[0] == "versions" else ""
    front = request.app[_FRONT]
    if not front.instances_of(name, version) and parts[-1] == "ready":
        return _status_only(False)
    return await _proxy(request, front.route(name, version))


async def _proxy(request: web.Request, inst: ServiceInstance) -> web.StreamResponse:
    """Stream the request to ``inst`` and its answer back, headers and encodings kept."""
    data = request.content.iter_chunked(_CHUNK) if request.body_exists else None
    response = web.StreamResponse()
    try:
        async with request.app[_SESSION].request(
            request.method, _url(inst, request), headers=_forward_headers(request), data=data
        ) as upstream:
            response.set_status(upstream.status, upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_HEADERS:
                    response.headers.add(key, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                await response.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        if not response.prepared:
            raise _unavailable(inst, exc) from None
        # headers are sent: drop the connection so the client sees a broken, not a short, body
        log.warning("proxying %s to %r broke off: %s", request.path, inst.id, exc)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
