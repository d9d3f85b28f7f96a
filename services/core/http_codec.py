"""HTTP/REST wire ⇄ transport-agnostic requests: JSON + binary tensor data ⇄ InferRequest/Response.

The HTTP app (http_app.py) hands the body of ``POST /v2/models/{m}/infer`` to
``decode_infer_request``; the InferRequest goes to the data plane; ``encode_infer_response``
turns the InferResponse back into a body. This is the REST twin of codec.py (gRPC).

Body layout (KServe v2 + Triton's binary tensor data extension): with the header
``Inference-Header-Content-Length: N`` the first N bytes are the JSON object and the rest holds
the raw data of every input whose parameters carry ``binary_data_size``, in input order (BYTES
elements as 4-byte little-endian length + bytes). Binary inputs become numpy views over the body
(no copy; read-only). Inputs may instead carry JSON ``data`` (flat or nested lists, BYTES as
strings) or name a registered shared-memory region.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from services.core import dtypes
from services.core.dtypes import DataType
from services.core.errors import InvalidArgument, Unsupported
from services.core.http_json import JsonObject, get_int, get_object, get_str, parse_object
from services.core.requests import (
    Array,
    InferRequest,
    InferResponse,
    ParamValue,
    RequestedOutput,
    SharedMemoryRef,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
BINARY_SIZE = "binary_data_size"


class SharedMemoryReader(Protocol):
    """Read access to registered system shared-memory regions (implemented in shm.py)."""

    def read(
        self, region: str, offset: int, byte_size: int, *, tensor: str | None = None
    ) -> memoryview:
        """``byte_size`` bytes at ``offset`` of ``region``; NotFound / InvalidArgument if not."""
        ...


# ---- requests --------------------------------------------------------------------------------
def decode_infer_request(
    body: bytes,
    header_length: str | None,
    model_name: str,
    model_version: str,
    shm: SharedMemoryReader | None,
    arrival_ns: int,
) -> tuple[InferRequest, bool]:
    """Decode an infer body; returns the request and the request-level ``binary_data_output``.

    ``header_length`` is the Inference-Header-Content-Length header (None: all of it is JSON).
    Raises InvalidArgument naming the input and the fix.
    """
    view = memoryview(body)
    json_end = _json_length(header_length, len(body))
    doc = parse_object(view[:json_end], "the inference request")
    inputs_json = doc.get("inputs")
    if not isinstance(inputs_json, list):
        raise InvalidArgument(
            'the inference request has no \'inputs\' list; send "inputs": [{"name", "shape",'
            ' "datatype", "data"}, ...]'
        )
    offset = json_end
    inputs: dict[str, Array] = {}
    for index, item in enumerate(inputs_json):
        if not isinstance(item, dict):
            raise InvalidArgument(f"inputs[{index}] must be a JSON object")
        name = get_str(item, "name", f"inputs[{index}]")
        if name in inputs:
            raise InvalidArgument(f"input '{name}' appears more than once; send each input once")
        inputs[name], offset = _decode_input(item, name, view, offset, shm)
    if offset != len(body):
        raise InvalidArgument(
            f"the request body has {len(body) - offset} bytes of binary data that no input claims;"
            f" the '{BINARY_SIZE}' parameters of the inputs must add up to the bytes after the JSON"
        )
    params = get_object(doc, "parameters", "the inference request")
    priority, timeout_us, binary_default, rest = request_parameters(params)
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' of the inference request must be a string, got {request_id!r}")
    request = InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        outputs=_requested_outputs(doc.get("outputs")),
        id=request_id,
        priority=priority,
        timeout_us=timeout_us,
        parameters=rest,
        arrival_ns=arrival_ns,
    )
    return request, binary_default


def _json_length(header_length: str | None, total: int) -> int:
    if header_length is None:
        return total
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= total:
        raise InvalidArgument(
            f"{HEADER_LENGTH} is '{header_length}' but the body has {total} bytes; it must be the"
            " byte length of the JSON part at the start of the body"
        )
    return length


def _decode_input(
    item: JsonObject, name: str, body: memoryview, offset: int, shm: SharedMemoryReader | None
) -> tuple[Array, int]:
    """One input as a numpy array, and the body offset after its binary data."""
    source = f"input '{name}'"
    datatype = dtypes.lookup(get_str(item, "datatype", source), source)
    shape = _shape(item.get("shape"), source)
    params = get_object(item, "parameters", source)
    region = shared_memory_ref(params, source)
    has_data = "data" in item
    if BINARY_SIZE in params:
        if has_data or region is not None:
            raise InvalidArgument(f"{source} has '{BINARY_SIZE}' and also other data; send it once")
        size = get_int(params, BINARY_SIZE, f"the parameters of {source}")
        if offset + size > len(body):
            raise InvalidArgument(
                f"{source} declares {BINARY_SIZE} {size} but only {len(body) - offset} bytes of"
                " binary data remain in the body; make the sizes match the data sent"
            )
        where = f"its binary data ({BINARY_SIZE} {size})"
        return _from_buffer(
            datatype, shape, body[offset : offset + size], source, where
        ), offset + size
    if region is not None:
        if has_data:
            raise InvalidArgument(
                f"{source} names {REGION} '{region.region}' and also carries 'data'; send it once"
            )
        if shm is None:
            raise Unsupported(f"{source} uses shared memory, which this endpoint does not offer")
        buf = shm.read(region.region, region.offset, region.byte_size, tensor=name)
        where = f"shared memory region '{region.region}' ({BYTE_SIZE} {region.byte_size})"
        return _from_buffer(datatype, shape, buf, source, where), offset
    if not has_data:
        raise InvalidArgument(
            f"{source} has no 'data', no '{BINARY_SIZE}' and no '{REGION}'; send its values one way"
        )
    return from_json(datatype, shape, item["data"], source), offset


def _shape(value: object, source: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidArgument(
            f"{source} needs 'shape' as a list of non-negative integers, got {value!r}"
        )
    return tuple(value)


def _from_buffer(
    datatype: DataType, shape: tuple[int, ...], buf: memoryview, source: str, where: str
) -> Array:
    count = math.prod(shape)
    if datatype.byte_size == 0:
        return dtypes.deserialize_bytes(buf, count, source).reshape(shape)
    expected = count * datatype.byte_size
    if buf.nbytes != expected:
        raise InvalidArgument(
            f"{source} ({datatype.name}, shape {list(shape)}) needs {expected} bytes but {where}"
            f" holds {buf.nbytes}; make the data match the shape and datatype"
        )
    return np.frombuffer(buf, dtype=datatype.numpy).reshape(shape)


# JSON values each datatype accepts, as numpy dtype kinds of np.array(data).
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
#: numpy's kind of the values sent, in the words of an error message
_KIND_WORDS = {
    "b": "true/false",
    "i": "integers",
    "u": "integers",
    "f": "decimals",
    "U": "strings",
    "O": "mixed values",
}


def from_json(datatype: DataType, shape: tuple[int, ...], data: object, source: str) -> Array:
    count = math.prod(shape)
    if datatype.byte_size == 0:
        flat = _flatten_strings(data, source)
        if len(flat) != count:
            raise _count_error(source, shape, count, len(flat))
        out = np.empty(count, dtype=object)
        out[:] = flat
        return out.reshape(shape)
    try:
        values = np.array(data)
    except (ValueError, TypeError):
        raise InvalidArgument(
            f"'data' of {source} is not a flat or evenly nested list of numbers; check its nesting"
        ) from None
    if values.size != count:
        raise _count_error(source, shape, count, int(values.size))
    target = np.dtype(np.float32) if datatype.name == "BF16" else datatype.numpy
    kind = values.dtype.kind
    if target.kind in "iu" and kind in "fO" and _all_ints(data):
        # numpy guesses float64 (or object) for integers beyond int64 mixed with small ones
        kind = "i"
    if values.size and kind not in _JSON_KINDS.get(target.kind, ""):
        wanted = "true/false" if target.kind == "b" else "numbers"
        got = _KIND_WORDS.get(kind, "other values")
        raise InvalidArgument(
            f"'data' of {source} ({datatype.name}) must hold {wanted}, got {got} such as "
            f"{values.ravel()[:1].tolist()[0]!r}"
        )
    try:
        converted = np.array(data, dtype=target).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise InvalidArgument(f"'data' of {source} does not fit {datatype.name}: {exc}") from None
    return dtypes.float32_to_bf16(converted) if datatype.name == "BF16" else converted


def _all_ints(data: object) -> bool:
    """Whether the (nested) JSON list holds only integers (not bools, floats or strings)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, int) or isinstance(item, bool):
            return False
    return True


def _flatten_strings(data: object, source: str) -> list[bytes]:
    out: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item.encode())
        else:
            raise InvalidArgument(
                f"'data' of BYTES {source} must hold strings, got {item!r}; send other bytes as"
                f" binary data ('{BINARY_SIZE}')"
            )
    return out


def _count_error(source: str, shape: tuple[int, ...], count: int, got: int) -> InvalidArgument:
    return InvalidArgument(
        f"{source} has shape {list(shape)}, which needs {count} elements, but 'data' holds {got};"
        " make the values match the shape"
    )


def shared_memory_ref(params: Mapping[str, Any], source: str) -> SharedMemoryRef | None:
    """The shared-memory parameters of a tensor, or None when it names no region."""
    if REGION not in params:
        if BYTE_SIZE in params or OFFSET in params:
            raise InvalidArgument(f"{source} has {BYTE_SIZE}/{OFFSET} but no {REGION}; name it")
        return None
    region = get_str(params, REGION, source)
    if not region:
        raise InvalidArgument(f"{REGION} of {source} must be a non-empty string")
    return SharedMemoryRef(
        region=region,
        byte_size=get_int(params, BYTE_SIZE, f"the parameters of {source}"),
        offset=get_int(params, OFFSET, f"the parameters of {source}", 0),
    )


def _requested_outputs(value: object) -> list[RequestedOutput]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument("'outputs' of the inference request must be a list of objects")
    result: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidArgument(f"outputs[{index}] must be a JSON object")
        name = get_str(item, "name", f"outputs[{index}]")
        source = f"output '{name}'"
        if name in seen:
            raise InvalidArgument(f"{source} is requested more than once; ask for it once")
        seen.add(name)
        params = get_object(item, "parameters", source)
        region = shared_memory_ref(params, source)
        classification = get_int(params, "classification", f"the parameters of {source}", 0)
        if region is not None and classification:
            raise InvalidArgument(f"{source} asks for both {REGION} and classification; choose one")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidArgument(f"'binary_data' of {source} must be true or false")
        result.append(RequestedOutput(name, classification, binary, region))
    return result


def request_parameters(
    params: Mapping[str, Any],
) -> tuple[int, int, bool, dict[str, ParamValue]]:
    source = "the request parameters"
    priority = get_int(params, "priority", source, 0)
    timeout_us = get_int(params, "timeout", source, 0)
    binary = params.get("binary_data_output", False)
    if not isinstance(binary, bool):
        raise InvalidArgument("request parameter 'binary_data_output' must be true or false")
    rest: dict[str, ParamValue] = {}
    for key, value in params.items():
        if key in ("priority", "timeout", "binary_data_output"):
            continue
        if not isinstance(value, bool | int | float | str):
            raise InvalidArgument(
                f"request parameter '{key}' must be a string, number or boolean, got {value!r}"
            )
        rest[key] = value
    return priority, timeout_us, binary, rest


# ---- responses -------------------------------------------------------------------------------
def encode_infer_response(resp: InferResponse, binary_default: bool) -> tuple[bytes, int | None]:
    """The response body, and the JSON length when binary data follows it (None: all JSON).

    An output goes binary when it asked to (``binary_data``), else by ``binary_default``.
    """
    outputs: list[JsonObject] = []
    tail: list[bytes | memoryview] = []
    for out in resp.outputs:
        item: JsonObject = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        binary = binary_default if out.binary_data is None else out.binary_data
        if out.shared_memory is not None:
            # Written to the region: no data and no parameters here, as Triton answers. Triton's
            # C++ client (perf_analyzer) takes an output's "parameters" to mean binary data.
            pass
        elif binary:
            raw = _wire_bytes(out.datatype, out.data)
            item["parameters"] = {
                BINARY_SIZE: raw.nbytes if isinstance(raw, memoryview) else len(raw)
            }
            tail.append(raw)
        else:
            item["data"] = json_values(out.name, out.datatype, out.data)
        outputs.append(item)
    doc: JsonObject = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = dict(resp.parameters)
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not tail:
        return header, None
    return b"".join([header, *tail]), len(header)


def _wire_bytes(datatype: str, data: Array) -> bytes | memoryview:
    if datatype == "BYTES":
        return dtypes.serialize_bytes(data)
    return dtypes.to_wire_array(datatype, data).reshape(-1).view(np.uint8).data


def json_values(name: str, datatype: str, data: Array) -> list[Any]:
    flat = data.reshape(-1)
    if datatype == "BYTES":
        try:
            return [_as_text(v) for v in flat.tolist()]
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"output '{name}' holds bytes that are not UTF-8 text, which JSON cannot carry;"
                ' request it with "binary_data": true'
            ) from None
    if datatype == "BF16":
        bits = dtypes.to_wire_array("BF16", flat).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).tolist()  # type: ignore[no-any-return]
    return dtypes.to_wire_array(datatype, flat).tolist()  # type: ignore[no-any-return]


def _as_text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode()
    return str(value)
