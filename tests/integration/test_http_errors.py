"""HTTP/REST v2 over plain aiohttp: malformed and wrong requests answer the right status and a
message naming the problem, each followed by a good request that must still succeed; request
parameters and compression negotiated by hand."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.support import ServerThread

HEADER = "Inference-Header-Content-Length"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# ---- errors over raw HTTP -----------------------------------------------------------------------
def _simple_json(rows: int = 1, datatype: str = "INT32", width: int = 16) -> dict[str, Any]:
    data = list(range(rows * width))
    return {
        "inputs": [
            {"name": n, "shape": [rows, width], "datatype": datatype, "data": data}
            for n in ("INPUT0", "INPUT1")
        ]
    }


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with session.post(url, data=body, headers=headers or {}) as resp:
        return resp.status, json.loads(await resp.read())


async def _good_request(session: aiohttp.ClientSession, base: str) -> None:
    status, doc = await _post(
        session, f"{base}/v2/models/simple/infer", json.dumps(_simple_json()).encode()
    )
    assert status == 200, doc
    assert doc["outputs"][0]["data"] == [2 * i for i in range(16)]


def _binary_bytes_body(payload: bytes, shape: list[int]) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "shape": shape,
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(payload)},
                }
                for n in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()
    return header + payload + payload, {HEADER: str(len(header))}


async def test_errors_then_good_request(
    onnx_server: ServerThread, session: aiohttp.ClientSession
) -> None:
    base = f"http://{onnx_server.http_url}"
    infer = f"{base}/v2/models/simple/infer"
    good_bytes = b"".join(struct.pack("<I", 1) + b"7" for _ in range(16))
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        ("malformed JSON", b'{"inputs": [', {}, 400, "malformed JSON"),
        ("not an object", b"[1, 2]", {}, 400, "JSON object"),
        ("no inputs", b"{}", {}, 400, "'inputs'"),
        ("wrong datatype", json.dumps(_simple_json(datatype="FP32")).encode(), {}, 400, "INPUT0"),
        ("unknown datatype", json.dumps(_simple_json(datatype="INT33")).encode(), {}, 400, "INT33"),
        ("wrong shape", json.dumps(_simple_json(width=15)).encode(), {}, 400, "INPUT0"),
        ("too big a batch", json.dumps(_simple_json(rows=9)).encode(), {}, 400, "batch"),
    ]
    count_mismatch = _simple_json()
    count_mismatch["inputs"][0]["data"] = [1, 2, 3]
    cases.append(("data count", json.dumps(count_mismatch).encode(), {}, 400, "INPUT0"))
    missing = _simple_json()
    del missing["inputs"][1]["shape"]
    cases.append(("missing shape", json.dumps(missing).encode(), {}, 400, "INPUT1"))
    # binary_data_size beyond the body, and a size that does not fit the shape
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "shape": [1, 16],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 64},
                }
            ]
        }
    ).encode()
    cases.append(
        ("binary past end", header + b"\0" * 10, {HEADER: str(len(header))}, 400, "INPUT0")
    )
    small = np.zeros(15, np.int32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "shape": [1, 16],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": len(small)},
                }
                for n in ("INPUT0", "INPUT1")
            ]
        }
    ).encode()
    cases.append(
        (
            "byte size mismatch",
            header + small + small,
            {HEADER: str(len(header))},
            400,
            "needs 64 bytes",
        )
    )
    cases.append(("bad header length", b"{}", {HEADER: "99"}, 400, HEADER))
    # bodies that cannot be read or parsed at all: still a 400 that says why, not a 500
    deep = b'{"inputs": [{"name": "INPUT0", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
    cases.append(("nested too deeply", deep, {}, 400, "too deeply"))
    gzip_header = {"Content-Encoding": "gzip"}
    cases.append(
        ("not gzip", b"plain text", gzip_header, 400, "(Can not decode content-encoding: gzip)")
    )
    brotli = {"Content-Encoding": "br"}
    cases.append(("brotli", b"\x0b\x00\x80{}\x03", brotli, 400, "cannot be read"))
    decimals = _simple_json()
    decimals["inputs"][0]["data"][0] = 1.5
    cases.append(
        ("decimals for INT32", json.dumps(decimals).encode(), {}, 400, "decimals such as 1.5")
    )
    for name, body, headers, status, text in cases:
        got_status, doc = await _post(session, infer, body, headers)
        assert (got_status, text in doc.get("error", "")) == (status, True), (name, doc)
        await _good_request(session, base)

    # malformed BYTES: the length prefix claims more than there is
    body, headers = _binary_bytes_body(struct.pack("<I", 100) + b"abc", [1, 1])
    async with session.post(
        f"{base}/v2/models/simple_string/infer", data=body, headers=headers
    ) as r:
        assert r.status == 400
        assert "malformed BYTES data for input 'INPUT0'" in (await r.json())["error"]
    body, headers = _binary_bytes_body(good_bytes, [1, 16])
    async with session.post(
        f"{base}/v2/models/simple_string/infer", data=body, headers=headers
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["outputs"][0]["data"] == ["14"] * 16

    for url, status in (
        (f"{base}/v2/models/no_such_model/infer", 404),
        (f"{base}/v2/models/simple/versions/7/infer", 404),
    ):
        got_status, doc = await _post(session, url, json.dumps(_simple_json()).encode())
        assert got_status == status and doc["error"], doc
        await _good_request(session, base)

    async with session.get(f"{base}/v2/no/such/route") as r:
        assert r.status == 404 and "error" in await r.json()


async def test_binary_data_output_parameter_and_gzip_body(
    onnx_server: ServerThread, session: aiohttp.ClientSession
) -> None:
    base = f"http://{onnx_server.http_url}"
    doc = _simple_json()
    doc["parameters"] = {"binary_data_output": True}
    doc["id"] = "bin"
    body = gzip.compress(json.dumps(doc).encode())
    async with session.post(
        f"{base}/v2/models/simple/infer", data=body, headers={"Content-Encoding": "gzip"}
    ) as r:
        assert r.status == 200
        assert r.content_type == "application/octet-stream"
        raw = await r.read()
        length = int(r.headers[HEADER])
    header = json.loads(raw[:length])
    assert header["id"] == "bin"
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sizes == [64, 64] and len(raw) == length + 128
    np.testing.assert_array_equal(
        np.frombuffer(raw[length : length + 64], np.int32), 2 * np.arange(16)
    )
    body = zlib.compress(json.dumps(_simple_json()).encode())
    status, doc = await _post(
        session, f"{base}/v2/models/simple/infer", body, {"Content-Encoding": "deflate"}
    )
    assert status == 200 and "data" in doc["outputs"][0]


@pytest.mark.parametrize(
    ("accept", "expected"),
    [("gzip", "gzip"), ("deflate", "deflate"), ("gzip, deflate, br", None), ("identity", None)],
)
async def test_response_compressed_only_when_asked(
    onnx_server: ServerThread, accept: str, expected: str | None
) -> None:
    url = f"http://{onnx_server.http_url}/v2/models/simple/infer"
    body = json.dumps(_simple_json()).encode()
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.post(url, data=body, headers={"Accept-Encoding": accept}) as r,
    ):
        assert r.status == 200
        assert r.headers.get("Content-Encoding") == expected
        raw = await r.read()
    if expected == "gzip":
        raw = gzip.decompress(raw)
    elif expected == "deflate":
        raw = zlib.decompress(raw)
    assert json.loads(raw)["outputs"][0]["data"] == [2 * i for i in range(16)]


async def test_repository_index_ready_filter(
    onnx_server: ServerThread, session: aiohttp.ClientSession
) -> None:
    url = f"http://{onnx_server.http_url}/v2/repository/index"
    status, entries = await _post(session, url, b'{"ready": true}')
    assert status == 200 and entries
    assert all(e["state"] == "READY" for e in entries)
    status, doc = await _post(session, url, b'{"ready": "yes"}')
    assert status == 400 and "'ready'" in doc["error"]
    status, doc = await _post(session, url, b"")
    assert status == 200 and {e["name"] for e in doc} >= {"simple", "cnn"}
