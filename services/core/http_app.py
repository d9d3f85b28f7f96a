"""HTTP/REST transport: the KServe v2 REST API with Triton's extensions, over the data plane.

The REST twin of grpc_servicer.py: each route decodes its request (http_codec.py for tensors),
calls one DataPlane method and renders the answer as Triton does, so ``tritonclient.http`` (sync
and aio) works unchanged. Errors are translated in one place, ``_errors`` (a middleware): a
ServingError becomes ``{"error": message}`` with its HTTP status; aiohttp's own HTTP errors (no
such route, body too large) keep their status; anything else is logged with its traceback and
answered 500 with a generic message. Every request but the health probes and trace settings
runs in an OpenTelemetry SERVER span (``_tracing``, inside ``_errors``), a child of the caller's
``traceparent``. The generate extension's routes (``/generate``, ``/generate_stream``) live in
http_generate.py.

Request bodies sent with ``Content-Encoding: gzip`` or ``deflate`` are decompressed by aiohttp's
parser before a handler reads them; infer responses are compressed when the client's
``Accept-Encoding`` asks for gzip or deflate.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.core import http_codec as codec
from services.core import http_json as js
from services.core import trace_settings, tracing
from services.core.dataplane import DataPlane
from services.core.errors import InvalidArgument, ServingError, Unsupported
from services.core.http_generate import generate_routes
from services.core.log_settings import apply_log_settings, current_settings

log = logging.getLogger(__name__)

#: set by the gateway: the model version its route (or traffic split) chose
VERSION_HEADER = "meshserve-version"

#: tritonclient sends whole tensors in one body; allow what gRPC allows (INT32_MAX bytes)
MAX_BODY_BYTES = 2**31 - 1

_PLANE: web.AppKey[DataPlane] = web.AppKey("plane", DataPlane)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: the mesh's REST health check (the gateway's clusters): the service is up and not leaving,
#: whatever its models' states (/v2/health/ready follows --strict-readiness)
SERVING_PATH = "/meshserve/v1/serving"


def build_http_app(plane: DataPlane) -> web.Application:
    """The aiohttp application serving ``plane`` over HTTP/REST v2 (run it with AppRunner)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors, _tracing])
    app[_PLANE] = plane
    r = app.router
    r.add_get("/v2/health/live", _server_live)
    r.add_get("/v2/health/ready", _server_ready)
    r.add_get(SERVING_PATH, _serving)
    r.add_get("/v2", _server_metadata)
    r.add_get("/v2/models/stats", _model_statistics)
    model_paths = ["/v2/models/{model}", "/v2/models/{model}/versions/{version}"]
    generate_routes(r, model_paths, _plane, _model)
    for model in model_paths:
        r.add_get(model, _model_metadata)
        r.add_get(f"{model}/ready", _model_ready)
        r.add_get(f"{model}/config", _model_config)
        r.add_get(f"{model}/stats", _model_statistics)
        r.add_post(f"{model}/infer", _infer)
        r.add_get(f"{model}/trace/setting", _trace_setting)
        r.add_post(f"{model}/trace/setting", _trace_setting)
    r.add_post("/v2/repository/index", _repository_index)
    r.add_post("/v2/repository/models/{model}/load", _load)
    r.add_post("/v2/repository/models/{model}/unload", _unload)
    for prefix, kind in (("/v2/systemsharedmemory", "system"), ("/v2/cudasharedmemory", "cuda")):
        status = _system_shm_status if kind == "system" else _cuda_shm_status
        register = _system_shm_register if kind == "system" else _cuda_shm_register
        unregister = _system_shm_unregister if kind == "system" else _cuda_shm_unregister
        r.add_get(f"{prefix}/status", status)
        r.add_get(f"{prefix}/region/{{region}}/status", status)
        r.add_post(f"{prefix}/region/{{region}}/register", register)
        r.add_post(f"{prefix}/unregister", unregister)
        r.add_post(f"{prefix}/region/{{region}}/unregister", unregister)
    r.add_get("/v2/logging", _logging)
    r.add_post("/v2/logging", _logging)
    r.add_get("/v2/trace/setting", _trace_setting)
    r.add_post("/v2/trace/setting", _trace_setting)
    return app


# ---- the one place errors are translated -------------------------------------------------------
@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServingError as exc:
        return _error(exc.http_status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, f"{exc.reason}: {request.method} {request.path}")
    except web.RequestPayloadError as exc:
        return js.unreadable_body(request, exc)
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return _error(500, f"internal error in {request.method} {request.path}; see the server log")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _tracing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A SERVER span per request; not for health and readiness probes (the mesh's own,
    ``SERVING_PATH``, included) and trace settings, as over gRPC (grpc_translate.UNTRACED)."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    if route in (SERVING_PATH, "/v2/health/live", "/v2/health/ready") or route.endswith(
        ("/ready", "/trace/setting")
    ):
        return await handler(request)
    attributes: tracing.Attributes = {
        "http.request.method": request.method,
        "http.route": route,
        "url.path": request.path,
    }
    if "model" in request.match_info:
        attributes.update(tracing.model_attributes(*_model(request)))
    name = f"{request.method} {route}".rstrip()
    with tracing.server_span(name, request.headers, attributes) as span:
        try:
            response = await handler(request)
        except ServingError as exc:
            span.set_attribute("http.response.status_code", exc.http_status)
            tracing.set_error(span, exc.message)
            raise
        except web.HTTPException as exc:
            span.set_attribute("http.response.status_code", exc.status)
            if exc.status >= 400:
                tracing.set_error(span, f"{exc.status} {exc.reason}")
            raise
        except Exception as exc:
            span.set_attribute("http.response.status_code", 500)
            tracing.set_error(span, f"internal error: {type(exc).__name__}", exc)
            raise
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 400:
            tracing.set_error(span, f"HTTP {response.status}")
        return response


# ---- helpers ------------------------------------------------------------------------------
def _plane(request: web.Request) -> DataPlane:
    return request.app[_PLANE]


def _model(request: web.Request) -> tuple[str, str]:
    # The gateway names the version it chose (traffic split) in a header when the path has none.
    version = request.match_info.get("version", "") or request.headers.get(VERSION_HEADER, "")
    return request.match_info["model"], version


async def _body(request: web.Request, what: str) -> js.JsonObject:
    return js.parse_object(await request.read(), what)


def _status_only(ok: bool) -> web.Response:
    # Triton answers health and readiness with an empty body: 200 yes, 400 no.
    return web.Response(status=200 if ok else 400)


# ---- health & metadata --------------------------------------------------------------------
async def _server_live(request: web.Request) -> web.Response:
    return _status_only(_plane(request).server_live())


async def _server_ready(request: web.Request) -> web.Response:
    return _status_only(_plane(request).server_ready())


async def _serving(request: web.Request) -> web.Response:
    return _status_only(_plane(request).serving())


async def _server_metadata(request: web.Request) -> web.Response:
    return web.json_response(js.message_to_json(_plane(request).server_metadata()))


async def _model_ready(request: web.Request) -> web.Response:
    return _status_only(_plane(request).model_ready(*_model(request)))


async def _model_metadata(request: web.Request) -> web.Response:
    return web.json_response(js.message_to_json(_plane(request).model_metadata(*_model(request))))


async def _model_config(request: web.Request) -> web.Response:
    return web.json_response(js.message_to_json(_plane(request).model_config(*_model(request))))


async def _model_statistics(request: web.Request) -> web.Response:
    name = request.match_info.get("model", "")
    version = request.match_info.get("version", "")
    return web.json_response(js.message_to_json(_plane(request).model_statistics(name, version)))


# ---- inference -------------------------------------------------------------------------------
async def _infer(request: web.Request) -> web.Response:
    plane = _plane(request)
    name, version = _model(request)
    body = await request.read()
    req, binary_default = codec.decode_infer_request(
        body,
        request.headers.get(codec.HEADER_LENGTH),
        name,
        version,
        plane.shm,
        arrival_ns=time.monotonic_ns(),
    )
    req.trace_context = tracing.current_context()
    if req.id:
        tracing.annotate({tracing.REQUEST_ID: req.id})
    payload, header_length = codec.encode_infer_response(await plane.infer(req), binary_default)
    if header_length is None:
        response = web.Response(body=payload, content_type="application/json")
    else:
        response = web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={codec.HEADER_LENGTH: str(header_length)},
        )
    coding = _requested_coding(request.headers.get("Accept-Encoding", ""))
    if coding is not None:
        response.enable_compression(force=coding)
    return response


def _requested_coding(accept_encoding: str) -> web.ContentCoding | None:
    """Compress only when the client names gzip or deflate alone, as tritonclient's
    ``response_compression_algorithm`` does. A generic list ("gzip, deflate, br": aiohttp's and
    browsers' default) gets the identity encoding, which HTTP always allows, so tensors are not
    compressed for clients that did not ask (compression costs more CPU than it saves here)."""
    codings: list[str] = []
    for part in accept_encoding.split(","):
        name, _, params = part.partition(";")
        q = params.replace(" ", "").lower().removeprefix("q=")
        with contextlib.suppress(ValueError):
            if params and float(q) == 0:
                continue  # "gzip;q=0" refuses gzip
        if name.strip():
            codings.append(name.strip().lower())
    if len(codings) == 1 and codings[0] in ("gzip", "deflate"):
        return web.ContentCoding(codings[0])
    return None


# ---- repository ------------------------------------------------------------------------------
async def _repository_index(request: web.Request) -> web.Response:
    doc = await _body(request, "the repository index request")
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidArgument(
            f"'ready' of the repository index request must be true or false, got {ready!r}"
        )
    entries = []
    for m in _plane(request).repository_index(ready).models:
        entry: dict[str, str] = {"name": m.name}
        if m.version:
            entry["version"] = m.version
        entry["state"] = m.state
        if m.reason:
            entry["reason"] = m.reason
        entries.append(entry)
    return web.json_response(entries)


async def _load(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    source = f"the load request for '{name}'"
    params = js.get_object(await _body(request, source), "parameters", source)
    config_json: str | None = None
    files: dict[str, bytes] = {}
    for key in params:
        if key == "config":
            config_json = js.get_str(params, key, source)
        elif key.startswith("file:"):
            files[key.removeprefix("file:")] = _base64(js.get_str(params, key, source), key)
        else:
            raise InvalidArgument(
                f"unknown load parameter '{key}'; expected 'config' or 'file:<path>'"
            )
    await _plane(request).load_model(name, config_json, files)
    return web.Response()


def _base64(text: str, key: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(
            f"load parameter '{key}' must be the file's bytes in base64"
        ) from None


async def _unload(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    source = f"the unload request for '{name}'"
    # "unload_dependents" is accepted and has nothing to do: dependents are separate models here.
    js.get_object(await _body(request, source), "parameters", source)
    await _plane(request).unload_model(name)
    return web.Response()


# ---- shared memory -------------------------------------------------------------------------
async def _system_shm_status(request: web.Request) -> web.Response:
    regions = _plane(request).shm.status(request.match_info.get("region") or None)
    return web.json_response(
        [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in regions
        ]
    )


async def _system_shm_register(request: web.Request) -> web.Response:
    region = request.match_info["region"]
    source = f"the register request for region '{region}'"
    doc = await _body(request, source)
    _plane(request).shm.register(
        region,
        js.get_str(doc, "key", source),
        js.get_int(doc, "offset", source, 0),
        js.get_int(doc, "byte_size", source),
    )
    return web.Response()


async def _system_shm_unregister(request: web.Request) -> web.Response:
    _plane(request).shm.unregister(request.match_info.get("region") or None)
    return web.Response()


async def _cuda_shm_status(request: web.Request) -> web.Response:
    # No CUDA region is ever registered (register answers Unsupported), so this lists none.
    regions = _plane(request).cuda_shm.status(request.match_info.get("region") or None)
    return web.json_response([{"name": r.name, "byte_size": r.byte_size} for r in regions])


async def _cuda_shm_register(request: web.Request) -> web.Response:
    region = request.match_info["region"]
    source = f"the CUDA register request for region '{region}'"
    doc = await _body(request, source)
    handle = js.get_object(doc, "raw_handle", source)
    raw = _base64(js.get_str(handle, "b64", f"'raw_handle' of {source}", ""), "raw_handle.b64")
    _plane(request).cuda_shm.register(
        region, raw, js.get_int(doc, "device_id", source, 0), js.get_int(doc, "byte_size", source)
    )
    return web.Response()


async def _cuda_shm_unregister(request: web.Request) -> web.Response:
    _plane(request).cuda_shm.unregister(request.match_info.get("region") or None)
    return web.Response()


# ---- log & trace settings -------------------------------------------------------------------
async def _logging(request: web.Request) -> web.Response:
    state = _plane(request).state.log_settings
    if request.method == "GET":
        return web.json_response(current_settings(state))
    updates = await _body(request, "the log settings request")
    return web.json_response(apply_log_settings(state, updates))


async def _trace_setting(request: web.Request) -> web.Response:
    model = request.match_info.get("model", "")
    body = await _body(request, "the trace setting request") if request.method == "POST" else {}
    store = tracing.trace_settings()
    if store is None:
        if body:
            raise Unsupported(tracing.TRACING_OFF)
        return web.json_response({"trace_level": ["OFF"]})
    if body:
        current = store.update(model, trace_settings.updates_from_json(body))
    else:
        current = store.get(model)
    return web.json_response(trace_settings.settings_to_json(current))
