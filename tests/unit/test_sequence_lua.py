"""The gateway's sequence-affinity Lua scripts (control_plane/sequence_affinity.py), run in LuaJIT
(lupa) as Envoy runs them, against a stand-in for Envoy's stream handle: the header they set from
real ModelInfer messages (serialized by protobuf, framed as gRPC) and REST bodies.

The stand-in keeps Envoy's rule that objects the handle gave are invalid once ``body()`` has
waited for the body, so a script that used them would fail here as it failed in Envoy."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from lupa import luajit21

from control_plane.sequence_affinity import GRPC_SOURCE, HTTP_SOURCE, SCAN_LIMIT, SEQUENCE_HEADER
from protos.gen.inference import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"

_HANDLE = b"""
return function(hdrs, body_bytes)
  local generation = 0
  local function scoped(methods)
    local made = generation
    local object = {}
    for name, fn in pairs(methods) do
      object[name] = function(self, ...)
        if made ~= generation then error("object used outside of proper scope") end
        return fn(...)
      end
    end
    return object
  end
  local handle = {}
  function handle:headers()
    return scoped({
      get = function(k) return hdrs[k] end,
      replace = function(k, v) hdrs[k] = v end,
    })
  end
  function handle:body()
    generation = generation + 1  -- the script waited for the body
    if body_bytes == nil then return nil end
    return {
      length = function(self) return #body_bytes end,
      getBytes = function(self, i, n)
        if i < 0 or n < 0 or i + n > #body_bytes then error("getBytes out of range") end
        return body_bytes:sub(i + 1, i + n)
      end,
    }
  end
  return handle
end
"""


def run(source: str, headers: dict[str, str], body: bytes | None) -> str | None:
    """Run ``source``'s envoy_on_request; the header it left (None: none)."""
    lua: Any = luajit21.LuaRuntime(encoding=None)
    lua.execute(source.encode())
    table = lua.table_from({k.encode(): v.encode() for k, v in headers.items()})
    lua.globals().envoy_on_request(lua.execute(_HANDLE)(table, body))
    value = table[SEQUENCE_HEADER.encode()]
    return None if value is None else bytes(value).decode()


def frame(message: bytes, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + struct.pack(">I", len(message)) + message


def infer_request(sequence_id: int | str | None, *, unsigned: bool = False, raw: int = 4) -> bytes:
    """A ModelInferRequest as tritonclient builds it: other parameters around the ID (one of
    them another int64), an input, raw contents."""
    request = pb.ModelInferRequest(model_name="simple_sequence", model_version="1", id="r-1")
    request.parameters["timeout"].int64_param = 777
    if isinstance(sequence_id, str):
        request.parameters["sequence_id"].string_param = sequence_id
    elif sequence_id is not None and unsigned:
        request.parameters["sequence_id"].uint64_param = sequence_id
    elif sequence_id is not None:
        request.parameters["sequence_id"].int64_param = sequence_id
    request.parameters["sequence_start"].bool_param = True
    request.parameters["weight"].double_param = 0.5
    request.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
    request.raw_input_contents.append(b"\x07" * raw)
    return frame(request.SerializeToString())


@pytest.mark.parametrize(
    ("sequence_id", "header"),
    [
        (5, "5"),
        (2**63 - 1, "9223372036854775807"),  # exact past 2^53 (Lua numbers are doubles)
        (123456789012345678, "123456789012345678"),
        ("session-7", "session-7"),
        ("a b/é", "x6120622fc3a9"),  # not header-safe: hex
        (0, None),  # 0 is no correlation ID
        ("", None),
        (None, None),
    ],
)
def test_grpc_header_from_the_sequence_id_parameter(
    sequence_id: int | str | None, header: str | None
) -> None:
    assert run(GRPC_SOURCE, {":path": INFER}, infer_request(sequence_id)) == header


def test_grpc_unsigned_ids_to_64_bits_and_large_requests() -> None:
    unsigned = infer_request(2**64 - 1, unsigned=True)
    assert run(GRPC_SOURCE, {":path": INFER}, unsigned) == "18446744073709551615"
    big = infer_request(42, raw=4 * SCAN_LIMIT)  # raw contents far past the scan limit
    assert run(GRPC_SOURCE, {":path": INFER}, big) == "42"


def test_grpc_leaves_streams_compressed_and_cut_messages_alone() -> None:
    stream = {":path": "/inference.GRPCInferenceService/ModelStreamInfer"}
    assert run(GRPC_SOURCE, stream, None) is None  # body() would wait for the stream's end
    plain = infer_request(9)
    compressed = frame(plain[5:], compressed=True)
    assert run(GRPC_SOURCE, {":path": INFER}, compressed) is None
    assert run(GRPC_SOURCE, {":path": INFER}, plain[:20]) is None
    assert run(GRPC_SOURCE, {":path": INFER}, b"\x00\x00") is None


def test_grpc_keeps_a_header_the_client_sent_when_the_body_has_no_id() -> None:
    headers = {":path": INFER, SEQUENCE_HEADER: "pinned"}
    assert run(GRPC_SOURCE, headers, infer_request(None)) == "pinned"
    assert run(GRPC_SOURCE, headers, infer_request(3)) == "3"


REST = {":method": "POST", ":path": "/v2/models/simple_sequence/infer"}


@pytest.mark.parametrize(
    ("body", "header"),
    [
        ({"inputs": [], "parameters": {"sequence_id": 5, "sequence_start": True}}, "5"),
        ({"parameters": {"sequence_id": 123456789012345678}}, "123456789012345678"),
        ({"parameters": {"sequence_start": True, "sequence_id": "session-7"}}, "session-7"),
        ({"parameters": {"sequence_id": 0}}, None),
        ({"inputs": [{"name": "sequence_id", "datatype": "INT32"}]}, None),
    ],
)
def test_rest_header_from_the_json_parameters(body: dict[str, Any], header: str | None) -> None:
    assert run(HTTP_SOURCE, REST, json.dumps(body).encode()) == header


def test_rest_reads_only_the_json_part_and_only_inference_posts() -> None:
    head = json.dumps({"parameters": {"sequence_id": 9}}).encode()
    binary = {**REST, "inference-header-content-length": str(len(head))}
    tail = b'"sequence_id": 1' + b"\xff" * 64  # tensor bytes that happen to look like JSON
    assert run(HTTP_SOURCE, binary, head + tail) == "9"
    assert run(HTTP_SOURCE, {**REST, ":path": "/v2/models/m/versions/2/generate"}, head) == "9"
    assert run(HTTP_SOURCE, {**REST, ":path": "/v2/models/m/generate_stream?x=1"}, head) == "9"
    assert run(HTTP_SOURCE, {**REST, ":method": "GET"}, head) is None
    assert run(HTTP_SOURCE, {**REST, ":path": "/v2/models/m/ready"}, head) is None
    assert run(HTTP_SOURCE, {**REST, "content-encoding": "gzip"}, head) is None


def test_one_id_gives_one_header_over_grpc_and_rest() -> None:
    for sid in (17, "s-17"):
        rest = json.dumps({"parameters": {"sequence_id": sid}}).encode()
        assert run(GRPC_SOURCE, {":path": INFER}, infer_request(sid)) == run(
            HTTP_SOURCE, REST, rest
        )
