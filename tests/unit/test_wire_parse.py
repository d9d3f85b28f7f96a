"""wire.py: ModelInferRequest parsed with raw_input_contents left as views over the message.

Every walked message must equal what protobuf's own parse gives (raw entries aside), keep its
raw entries in order as zero-copy views, and refuse malformed data with InvalidArgument. The
last tests serve a real (empty) server to check the gRPC side: the swapped deserializer and
the INVALID_ARGUMENT status for a message that does not parse.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc._utils import _get_inference_request

from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from services.core.codec import decode_infer_request
from services.core.errors import InvalidArgument
from services.core.wire import (
    WALK_MIN_BYTES,
    deserialize_infer,
    parse_infer_request,
    walk_infer_request,
)
from tests.support import ServerThread, settings_for
from tests.unit.tensor_samples import ALL, assert_same, sample

# --- helpers ----------------------------------------------------------------------------------


def full_request(raw: list[bytes]) -> pb.ModelInferRequest:
    """A request using every ModelInferRequest field, nested parameters and typed contents."""
    msg = pb.ModelInferRequest(model_name="resnet", model_version="2", id="req-1")
    msg.parameters["priority"].int64_param = 3
    msg.parameters["tag"].string_param = "x"
    tensor = msg.inputs.add(name="IN", datatype="FP32", shape=[1, 2])
    tensor.parameters["p"].bool_param = True
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    msg.inputs.add(name="IN2", datatype="UINT8", shape=[4])
    out = msg.outputs.add(name="OUT")
    out.parameters["classification"].int64_param = 2
    msg.raw_input_contents.extend(raw)
    return msg


def without_raw(msg: pb.ModelInferRequest) -> pb.ModelInferRequest:
    copy = pb.ModelInferRequest()
    copy.CopyFrom(msg)
    copy.ClearField("raw_input_contents")
    return copy


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (field numbers below 16, lengths below 128)."""
    assert number < 16 and len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def assert_matches_protobuf(data: bytes) -> None:
    """The walk of ``data`` is what FromString gives: same fields, same raw entries as views."""
    expected = pb.ModelInferRequest.FromString(data)
    wire = walk_infer_request(data)
    assert wire.msg == without_raw(expected)
    # the same bytes too (unknown fields kept); deterministic: map entries in key order, else
    # protobuf writes them in whatever order its map iterates
    want = without_raw(expected).SerializeToString(deterministic=True)
    assert wire.msg.SerializeToString(deterministic=True) == want
    assert [bytes(r) for r in wire.raw] == list(expected.raw_input_contents)
    for view in wire.raw:
        assert isinstance(view, memoryview)
        assert view.obj is data


def triton_request(shape: tuple[int, ...]) -> bytes:
    data = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    tensor = grpcclient.InferInput("input", list(shape), "FP32")
    tensor.set_data_from_numpy(data)
    request: pb.ModelInferRequest = _get_inference_request(
        model_name="m",
        inputs=[tensor],
        outputs=[grpcclient.InferRequestedOutput("output")],
        model_version="",
        request_id="7",
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    return request.SerializeToString()


# --- round trips --------------------------------------------------------------------------------


def test_round_trip_every_field() -> None:
    raw = [b"\x01\x02\x03\x04", bytes(range(256)) * 3, b"tail"]
    data = full_request(raw).SerializeToString()
    assert_matches_protobuf(data)
    assert [bytes(r) for r in walk_infer_request(data).raw] == raw


def test_raw_views_share_memory_with_the_message() -> None:
    data = triton_request((3, 64, 64))
    wire = walk_infer_request(data)
    (view,) = wire.raw
    assert view.readonly
    as_array = np.frombuffer(view, np.float32)
    assert np.shares_memory(as_array, np.frombuffer(data, np.uint8))
    np.testing.assert_array_equal(as_array, np.arange(3 * 64 * 64, dtype=np.float32))


def test_interleaved_raw_entries_keep_their_order() -> None:
    parts = [
        field(7, b"first"),
        field(1, b"model"),
        field(7, b""),
        field(5, pb.ModelInferRequest.InferInputTensor(name="A").SerializeToString()),
        field(7, b"third"),
        field(3, b"id-1"),
        field(5, pb.ModelInferRequest.InferInputTensor(name="B").SerializeToString()),
        field(1, b"model-last-wins"),
        field(7, b"fourth"),
    ]
    data = b"".join(parts)
    assert_matches_protobuf(data)
    wire = walk_infer_request(data)
    assert [bytes(r) for r in wire.raw] == [b"first", b"", b"third", b"fourth"]
    assert wire.msg.model_name == "model-last-wins"
    assert [t.name for t in wire.msg.inputs] == ["A", "B"]


def test_unknown_fields_are_kept_as_protobuf_keeps_them() -> None:
    base = full_request([b"abcd"]).SerializeToString()
    unknown = b"".join(
        [
            varint(99 << 3 | 0) + varint(150),  # varint
            varint(20 << 3 | 1) + b"\x00" * 8,  # fixed64
            varint(21 << 3 | 5) + b"\x01" * 4,  # fixed32
            varint(1000 << 3 | 2) + varint(3) + b"xyz",  # length-delimited, 2-byte tag
            varint(7 << 3 | 0) + varint(5),  # field 7 as a varint: not raw data but unknown
        ]
    )
    for data in (base + unknown, unknown + base):
        assert_matches_protobuf(data)
        assert [bytes(r) for r in walk_infer_request(data).raw] == [b"abcd"]


def test_empty_message() -> None:
    wire = walk_infer_request(b"")
    assert wire.msg == pb.ModelInferRequest()
    assert list(wire.raw) == []


def test_zero_length_raw_entries() -> None:
    data = full_request([b"", b"ab", b""]).SerializeToString()
    assert_matches_protobuf(data)
    assert [r.nbytes for r in walk_infer_request(data).raw] == [0, 2, 0]


def test_large_entries_with_multi_byte_lengths() -> None:
    big = bytes(range(256)) * ((1 << 21) // 256 + 1)  # > 2**21 bytes: a 4-byte length varint
    data = full_request([b"small", big, b"x" * 200]).SerializeToString()
    assert_matches_protobuf(data)
    wire = walk_infer_request(data)
    assert wire.raw[1].nbytes == len(big) and bytes(wire.raw[1]) == big


def test_message_with_no_raw_entries_is_parsed_whole() -> None:
    data = full_request([]).SerializeToString()
    assert_matches_protobuf(data)
    assert list(walk_infer_request(data).raw) == []


# --- size threshold -----------------------------------------------------------------------------


def test_small_messages_are_parsed_by_protobuf() -> None:
    data = triton_request((256,))
    assert len(data) < WALK_MIN_BYTES
    wire = parse_infer_request(data)
    expected = pb.ModelInferRequest.FromString(data)
    assert wire.msg == expected
    assert list(wire.raw) == list(expected.raw_input_contents)


def test_large_messages_are_walked() -> None:
    data = triton_request((WALK_MIN_BYTES // 4,))
    wire = parse_infer_request(data)
    assert wire.msg == without_raw(pb.ModelInferRequest.FromString(data))
    assert [type(r) for r in wire.raw] == [memoryview]


@pytest.mark.parametrize("datatype", ALL)
def test_decoded_arrays_view_the_message(datatype: str) -> None:
    data_in = sample(datatype, (64, 128))
    tensor = grpcclient.InferInput("IN", list(data_in.shape), datatype)
    tensor.set_data_from_numpy(data_in)
    options: dict[str, Any] = {"model_version": "", "request_id": "", "sequence_id": 0}
    options.update(sequence_start=False, sequence_end=False, priority=0, timeout=None)
    msg = _get_inference_request(
        model_name="m", inputs=[tensor], outputs=None, parameters=None, **options
    )
    data = msg.SerializeToString()
    wire = walk_infer_request(data)
    arr = decode_infer_request(wire.msg, None, raw=wire.raw).inputs["IN"]
    assert_same(arr, data_in, datatype)
    if datatype != "BYTES":
        assert not arr.flags.writeable
        assert np.shares_memory(arr, np.frombuffer(data, np.uint8))


# --- malformed data -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x3a\x05abc", "raw_input_contents declares 5 bytes but only 3 remain"),
        (b"\x0a\x09model", "field 1 declares 9 bytes but only 5 remain"),
        (b"\x3a", "ends inside a varint"),
        (b"\x3a\x80\x80", "ends inside a varint"),
        (b"\xba", "ends inside a varint"),
        (b"\x0a" + b"\xff" * 11, "longer than 10 bytes"),
        (b"\x0b\x0c", "field 1 is a group"),
        (b"\x0e", "field 1 has invalid wire type 6"),
        (varint(20 << 3 | 1) + b"\x00\x00", "field 20 declares 8 bytes but only 2 remain"),
        (b"\x2a\x03\xff\xff\xff", "malformed ModelInferRequest (Error parsing message"),
        (b"\x02\x00", "malformed ModelInferRequest (Error parsing message"),
    ],
)
def test_malformed_messages_are_invalid_arguments(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        walk_infer_request(data)


def test_every_truncation_fails_exactly_when_protobuf_fails() -> None:
    data = full_request([b"\x00" * 40, b"abc"]).SerializeToString()
    for cut in range(len(data) + 1):
        piece = data[:cut]
        try:
            pb.ModelInferRequest.FromString(piece)
        except Exception:
            with pytest.raises(InvalidArgument):
                walk_infer_request(piece)
        else:
            assert_matches_protobuf(piece)


def test_corrupted_messages_parse_as_protobuf_or_fail_cleanly() -> None:
    rng = random.Random(5)
    data = full_request([b"\x00" * 30, b"abc"]).SerializeToString()
    for _ in range(2000):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        piece = bytes(corrupt)
        try:
            wire = walk_infer_request(piece)
        except InvalidArgument:
            continue
        expected = pb.ModelInferRequest.FromString(piece)
        assert wire.msg == without_raw(expected)
        assert [bytes(r) for r in wire.raw] == list(expected.raw_input_contents)


def test_small_garbage_is_an_invalid_argument_too() -> None:
    with pytest.raises(InvalidArgument, match="malformed ModelInferRequest"):
        parse_infer_request(b"\xff" * 20)


def test_deserializer_hands_the_error_to_the_handler() -> None:
    """gRPC would answer an exception raised in a deserializer with UNKNOWN."""
    result = deserialize_infer(b"\xff" * 20)
    assert isinstance(result, InvalidArgument)


# --- served -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    """A channel to a real server with no models (every infer names an unknown model)."""
    repo: Path = tmp_path_factory.mktemp("no_models")
    with (
        ServerThread(settings_for(repo, http_port=-1, metrics_port=-1), []) as server,
        grpc.insecure_channel(server.grpc_url) as chan,
    ):
        yield chan


def test_served_garbage_is_invalid_argument(channel: grpc.Channel) -> None:
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    cut_short = b"\x3a" + varint(2 * WALK_MIN_BYTES) + b"\x00" * WALK_MIN_BYTES
    for data in (b"\xff" * 20, cut_short):
        with pytest.raises(grpc.RpcError) as err:
            infer(data)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed ModelInferRequest" in err.value.details()


def test_served_walked_message_reaches_the_handler(channel: grpc.Channel) -> None:
    stub = pbg.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # the other methods are served as before
    data = triton_request((WALK_MIN_BYTES // 4,))
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(data)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'m'" in err.value.details()


def test_served_stream_answers_garbage_in_stream(channel: grpc.Channel) -> None:
    stream = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    replies = list(stream(iter([b"\xff" * 20, triton_request((WALK_MIN_BYTES // 4,))])))
    by_id = {r.infer_response.id: r.error_message for r in replies}
    assert by_id.keys() == {"", "7"}
    assert "malformed ModelInferRequest" in by_id[""]
    assert "unknown model 'm'" in by_id["7"]
