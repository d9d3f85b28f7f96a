"""JSON plumbing of the HTTP/REST transport: request bodies in, protocol messages out.

http_app.py and http_codec.py read every JSON body through ``parse_object`` and the typed
field getters here (so a malformed body or a wrong field type is a 400 that says what to fix),
and render the data plane's protobuf answers (model metadata, config, statistics) through
``message_to_json``: protobuf's JSON mapping with the field names of the .proto, every field
printed, and 64-bit integers as JSON numbers rather than strings, as Triton emits them and as
users read dims and counters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.core.errors import InvalidArgument

JsonObject = dict[str, Any]


def parse_json(data: bytes | memoryview, what: str) -> Any:
    """``data`` parsed as JSON; InvalidArgument quoting the parser's message if malformed."""
    try:
        return json.loads(bytes(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"malformed JSON in {what}: {exc}") from None
    except RecursionError:
        raise InvalidArgument(
            f"{what} nests JSON arrays or objects too deeply to parse; send flat 'data' lists"
        ) from None


def unreadable_body(request: web.Request, exc: Exception) -> web.Response:
    """The 400 for a body that could not be read (aiohttp's RequestPayloadError: a
    Content-Encoding it cannot decode, a body that is not what its encoding says). The
    connection closes after it, as its parser stopped mid-body; the rest of the body is not
    waited for."""
    cause = exc.__cause__ or exc  # aiohttp's own error (ContentEncodingError) says what failed
    detail = str(getattr(cause, "message", "") or cause).split("message:")[-1].strip()
    response = web.json_response(
        {
            "error": f"the request body cannot be read ({detail}); send it uncompressed or "
            "compressed with Content-Encoding gzip or deflate"
        },
        status=400,
    )
    response.force_close()
    request.content.feed_eof()
    return response


def parse_object(data: bytes | memoryview, what: str) -> JsonObject:
    """``data`` parsed as a JSON object (empty data gives ``{}``)."""
    if not data:
        return {}
    value = parse_json(data, what)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def get_int(obj: Mapping[str, Any], key: str, source: str, default: int | None = None) -> int:
    """A non-negative integer field; InvalidArgument if missing (without default) or wrong."""
    value = obj.get(key, default)
    if value is None:
        raise InvalidArgument(f"{source} has no '{key}'; add it as a non-negative integer")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"'{key}' of {source} must be a non-negative integer, got {value!r}")
    return value


def get_str(obj: Mapping[str, Any], key: str, source: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if value is None:
        raise InvalidArgument(f"{source} has no '{key}'; add it as a string")
    if not isinstance(value, str):
        raise InvalidArgument(f"'{key}' of {source} must be a string, got {value!r}")
    return value


def get_object(obj: Mapping[str, Any], key: str, source: str) -> JsonObject:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"'{key}' of {source} must be a JSON object, got {value!r}")
    return value


_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def message_to_json(msg: Message) -> JsonObject:
    """``msg`` in protobuf's JSON mapping (proto field names, every field printed) with 64-bit
    integers as JSON numbers, as Triton renders model configs, metadata and statistics."""
    data: JsonObject = json_format.MessageToDict(
        msg, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )
    _int64_as_numbers(msg.DESCRIPTOR, data)
    return data


def _int64_as_numbers(desc: Any, data: JsonObject) -> None:
    # desc: a protobuf Descriptor (the pure-Python or the upb class, which share this interface)
    for field in desc.fields:
        value = data.get(field.name)
        if value is None:
            continue
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            value_field = message.fields_by_name["value"]
            if value_field.message_type is not None:
                for entry in value.values():
                    if isinstance(entry, dict):
                        _int64_as_numbers(value_field.message_type, entry)
            elif value_field.cpp_type in _INT64:
                data[field.name] = {k: int(v) for k, v in value.items()}
        elif message is not None:
            for entry in value if isinstance(value, list) else [value]:
                if isinstance(entry, dict):
                    _int64_as_numbers(message, entry)
        elif field.cpp_type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
