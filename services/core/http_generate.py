"""Triton's generate extension (HTTP only): ``POST v2/models/<m>[/versions/<v>]/generate`` answers
one JSON object, ``.../generate_stream`` answers Server-Sent Events, one ``data:`` event per
response, so a decoupled model's responses (an LLM's tokens) reach ``curl -N`` as they come.

Where it sits in the data flow: HTTP app (http_app.py registers ``generate_routes``) ─▶
``generate_request`` (the flat JSON body to an InferRequest) ─▶ DataPlane.infer_stream ─▶
``generate_response`` (each response to a flat JSON object).

Request: each top-level field named like one of the model's inputs becomes that input, with the
config's datatype, from a value or a (nested) list of values shaped to the input's ``dims`` (a
-1 takes what the others leave; batching models get a batch of 1 in front). ``parameters`` (an
object of strings, numbers and booleans; ``priority`` and ``timeout`` as in infer) and every
other scalar field become request parameters, as Triton passes them; ``id`` is the request's id.
Response: ``model_name``, ``model_version`` (``id``), then every output by name: one element as a
plain value, more as a flat list, BYTES as text. Errors: ``{"error": message}`` with the status
the error carries; once a stream has begun (status 200 sent), a last event ``{"error": ...}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from aiohttp import web

from protos.gen.inference import model_config_pb2 as mc
from services.core import dtypes, tracing
from services.core import http_json as js
from services.core.dataplane import DataPlane
from services.core.errors import InvalidArgument, ServingError
from services.core.http_codec import from_json, json_values, request_parameters
from services.core.requests import Array, InferRequest, InferResponse

log = logging.getLogger(__name__)

SOURCE = "the generate request"
EVENT_STREAM = "text/event-stream; charset=utf-8"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---- JSON ⇄ request and response -----------------------------------------------------------------
def generate_request(
    doc: js.JsonObject, config: mc.ModelConfig, name: str, version: str
) -> InferRequest:
    """The InferRequest a generate body stands for (``config``: the model's)."""
    inputs: dict[str, Array] = {}
    names = [spec.name for spec in config.input]
    for spec in config.input:
        if spec.name in doc:
            inputs[spec.name] = _tensor(doc[spec.name], spec, config.max_batch_size > 0)
        elif not spec.optional:
            raise InvalidArgument(
                f"{SOURCE} for model '{name}' has no field '{spec.name}'; give a field per input"
                f" ({', '.join(names)})"
            )
    priority, timeout_us, _, parameters = request_parameters(
        js.get_object(doc, "parameters", SOURCE)
    )
    request_id = ""
    for key, value in doc.items():
        if key in names or key == "parameters":
            continue
        if key == "id" and isinstance(value, str):
            request_id = value
        elif isinstance(value, bool | int | float | str):
            parameters[key] = value
        else:
            raise InvalidArgument(
                f"field '{key}' of {SOURCE} is not an input of model '{name}' ({', '.join(names)})"
                " and not a parameter (a string, number or boolean)"
            )
    return InferRequest(
        name,
        version,
        inputs,
        id=request_id,
        priority=priority,
        timeout_us=timeout_us,
        parameters=parameters,
        arrival_ns=time.monotonic_ns(),
    )


def _tensor(value: object, spec: mc.ModelInput, batched: bool) -> Array:
    source = f"input '{spec.name}'"
    datatype = dtypes.lookup(dtypes.triton_from_config(spec.data_type), source)
    data = value if isinstance(value, list) else [value]
    shape = _shape(list(spec.dims), _count(data), source)
    return from_json(datatype, (1, *shape) if batched else shape, data, source)


def _count(data: list[Any]) -> int:
    count, stack = 0, list(data)
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
    return count


def _shape(dims: list[int], count: int, source: str) -> tuple[int, ...]:
    """``dims`` with the first -1 taking what the fixed dims leave of ``count`` (others 1)."""
    fixed = math.prod(d for d in dims if d != -1)
    wild = [i for i, d in enumerate(dims) if d == -1]
    if (not wild and fixed != count) or (wild and (fixed == 0 or count % fixed)):
        raise InvalidArgument(
            f"{source} has dims {dims}, which {count} value(s) cannot fill; send a multiple of"
            f" {fixed} value(s)"
            if wild
            else f"{source} has dims {dims}, which {count} value(s) cannot fill; send {fixed}"
        )
    shape = [1 if d == -1 else d for d in dims]
    if wild:
        shape[wild[0]] = count // fixed
    return tuple(shape)


def generate_response(response: InferResponse) -> js.JsonObject:
    """One response as the generate extension's flat JSON object."""
    doc: js.JsonObject = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        doc["id"] = response.id
    for out in response.outputs:
        values = json_values(out.name, out.datatype, out.data)
        doc[out.name] = values[0] if len(values) == 1 else values
    return doc


def sse_event(doc: js.JsonObject) -> bytes:
    """One Server-Sent Event carrying ``doc``."""
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


# ---- handlers ------------------------------------------------------------------------------------
def generate_routes(
    router: web.UrlDispatcher,
    model_paths: list[str],
    plane_of: Callable[[web.Request], DataPlane],
    model_of: Callable[[web.Request], tuple[str, str]],
) -> None:
    """Add ``<model path>/generate`` and ``/generate_stream`` for every model path pattern."""

    async def responses(request: web.Request) -> AsyncGenerator[InferResponse, None]:
        plane = plane_of(request)
        name, version = model_of(request)
        doc = js.parse_object(await request.read(), SOURCE)
        req = generate_request(doc, plane.model_config(name, version), name, version)
        req.trace_context = tracing.current_context()
        async for response in plane.infer_stream(req):
            if response.outputs:
                yield response

    async def generate(request: web.Request) -> web.StreamResponse:
        stream = responses(request)
        try:
            answers = [await anext(stream)]
            async for extra in stream:
                answers.append(extra)
                break
        except StopAsyncIteration:
            answers = []
        finally:
            await stream.aclose()
        if len(answers) != 1:
            name = model_of(request)[0]
            raise InvalidArgument(
                f"model '{name}' sent {'no response' if not answers else 'several responses'};"
                " /generate returns exactly one: call /generate_stream"
            )
        return web.json_response(generate_response(answers[0]))

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        stream = responses(request)
        try:
            first = await anext(stream, None)  # fails before any event: a plain JSON error
            out = web.StreamResponse(
                headers={"Content-Type": EVENT_STREAM, "Cache-Control": "no-cache"}
            )
            await out.prepare(request)
            try:
                if first is not None:
                    await out.write(sse_event(generate_response(first)))
                async for response in stream:
                    await out.write(sse_event(generate_response(response)))
            except ServingError as exc:
                await out.write(sse_event({"error": exc.message}))
            except ConnectionResetError:  # the client went away: closing the stream below
                return out  # cancels the model's work
            except Exception:
                log.exception("generate_stream of model %r failed", model_of(request)[0])
                await out.write(sse_event({"error": "internal error; see the server log"}))
            await out.write_eof()
            return out
        finally:
            await stream.aclose()

    for path in model_paths:
        router.add_post(f"{path}/generate", generate)
        router.add_post(f"{path}/generate_stream", generate_stream)
