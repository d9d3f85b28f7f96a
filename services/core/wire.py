"""Zero-copy parsing of ModelInfer messages: raw tensor bytes stay in the received buffer.

grpc.aio hands the ModelInfer / ModelStreamInfer deserializer the whole message as one ``bytes``
object. Parsing it with ``ModelInferRequest.FromString`` copies every tensor into the message,
and each read of ``raw_input_contents[i]`` copies it again. For large messages
``parse_infer_request`` walks the message's top-level fields instead: every
``raw_input_contents`` entry (field 7) becomes a ``memoryview`` slice of the received bytes, and
only the other fields (names, shapes, parameters: small) are joined and parsed by protobuf.
The codec (codec.py) turns those views into read-only numpy arrays without another copy.

Messages below ``WALK_MIN_BYTES`` are parsed by protobuf as a whole (``raw`` is then the
message's own ``raw_input_contents``): the walk costs about 2 µs of Python whatever the size,
which is what protobuf's parse and the two copies cost at about 32 KiB; a 1 KiB request takes
1.2 µs the protobuf way.

Groups (wire types 3 and 4, which grpc_service.proto never produces) are refused; other fields
are parsed by protobuf as sent, unknown ones included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from protos.gen.inference import grpc_service_pb2 as pb
from services.core.errors import InvalidArgument

#: ModelInferRequest.raw_input_contents (grpc_service.proto): repeated bytes, field 7
RAW_INPUT_FIELD = 7
#: messages shorter than this are parsed by protobuf alone (see the module docstring)
WALK_MIN_BYTES = 32 * 1024

_VARINT, _FIXED64, _LENGTH_DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
_RAW_TAG = (RAW_INPUT_FIELD << 3) | _LENGTH_DELIMITED
_MAX_VARINT_BYTES = 10
_MALFORMED = "malformed ModelInferRequest: "


@dataclass(slots=True)  # not frozen: that would double its cost (~0.1 µs) on every request
class WireInferRequest:
    """A received ModelInferRequest: its fields, and its raw input tensors kept apart.

    ``raw`` replaces ``msg.raw_input_contents`` (empty in ``msg`` once walked), in order: views
    over the received message (or ``bytes`` for messages protobuf parsed whole).
    """

    msg: pb.ModelInferRequest
    raw: Sequence[bytes | memoryview]


def parse_infer_request(data: bytes) -> WireInferRequest:
    """Parse a serialized ModelInferRequest; raises InvalidArgument when it does not parse."""
    if len(data) >= WALK_MIN_BYTES:
        return walk_infer_request(data)
    msg = _from_string(data)
    return WireInferRequest(msg, msg.raw_input_contents)


#: what ModelInfer / ModelStreamInfer receive for each message (see ``deserialize_infer``)
InferMessage = WireInferRequest | InvalidArgument


def deserialize_infer(data: bytes) -> InferMessage:
    """The request deserializer of ModelInfer and ModelStreamInfer.

    gRPC answers an exception raised by a deserializer with UNKNOWN, before the servicer's error
    translation sees it; so a message that does not parse reaches the handler as its error, and
    the handler raises it there (``parsed``: INVALID_ARGUMENT, traced and answered like any
    other failure).
    """
    try:
        return parse_infer_request(data)
    except InvalidArgument as exc:
        return exc


def parsed(request: InferMessage) -> WireInferRequest:
    """The parsed request, or the error its message did not parse with, raised."""
    if isinstance(request, InvalidArgument):
        raise request
    return request


def walk_infer_request(data: bytes) -> WireInferRequest:
    """Like ``parse_infer_request`` at any size: raw inputs always become views over ``data``."""
    view = memoryview(data)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    kept_from = 0  # start of the run of other fields not yet added to ``rest``
    pos = 0
    end = len(data)
    while pos < end:
        field_start = pos
        tag = data[pos]
        if tag < 0x80:  # one-byte tag: fields 1-15, as in every ModelInferRequest
            pos += 1
        else:
            tag, pos = _varint(data, pos, end)
        wire_type = tag & 7
        if wire_type == _LENGTH_DELIMITED:
            if pos < end and data[pos] < 0x80:
                length = data[pos]
                pos += 1
            else:
                length, pos = _varint(data, pos, end)
            if length > end - pos:
                raise _truncated(tag, length, end - pos)
            if tag == _RAW_TAG:
                raw.append(view[pos : pos + length])
                if field_start > kept_from:
                    rest.append(view[kept_from:field_start])
                kept_from = pos + length
            pos += length
        elif wire_type == _VARINT:
            pos = _varint(data, pos, end)[1]
        else:
            size = _fixed_size(tag)
            if size > end - pos:
                raise _truncated(tag, size, end - pos)
            pos += size
    if not raw:
        return WireInferRequest(_from_string(data), raw)
    if end > kept_from:
        rest.append(view[kept_from:end])
    return WireInferRequest(_from_string(b"".join(rest)), raw)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The base-128 varint at ``pos`` and the position after it."""
    result = 0
    shift = 0
    stop = min(end, pos + _MAX_VARINT_BYTES)
    while pos < stop:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    if pos >= end:
        raise InvalidArgument(f"{_MALFORMED}the message ends inside a varint; it was cut short")
    raise InvalidArgument(
        f"{_MALFORMED}the varint at byte {pos - _MAX_VARINT_BYTES} is longer than 10 bytes"
    )


def _fixed_size(tag: int) -> int:
    """Size of the value of a field that is neither varint nor length-delimited."""
    field, wire_type = tag >> 3, tag & 7
    if wire_type == _FIXED64:
        return 8
    if wire_type == _FIXED32:
        return 4
    if wire_type in (_START_GROUP, _END_GROUP):
        raise InvalidArgument(
            f"{_MALFORMED}field {field} is a group, which ModelInferRequest never carries;"
            " send a message serialized from grpc_service.proto"
        )
    raise InvalidArgument(f"{_MALFORMED}field {field} has invalid wire type {wire_type}")


def _truncated(tag: int, needed: int, left: int) -> InvalidArgument:
    field = "raw_input_contents" if tag == _RAW_TAG else f"field {tag >> 3}"
    return InvalidArgument(
        f"{_MALFORMED}{field} declares {needed} bytes but only {left} remain; the message was"
        " cut short or is corrupt"
    )


def _from_string(data: bytes) -> pb.ModelInferRequest:
    try:
        return pb.ModelInferRequest.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(
            f"malformed ModelInferRequest ({exc}); send a message serialized from"
            " grpc_service.proto"
        ) from exc
