"""Triton's generate extension on the real services: ``/generate`` and ``/generate_stream`` (SSE)
over HTTP against the ONNX service (``simple``, ``simple_string``) and the Python service
(``add_sub_python``; the decoupled ``repeat_python`` and ``text_stream_python``). Flat JSON in
and out, parameters from the ``parameters`` object and from extra fields, one event per response
of a decoupled model, and every refusal with its status and the service still serving."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ServerThread, settings_for


@pytest.fixture(scope="module")
def onnx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    from examples.build_repository import build_repository
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("generate_onnx")
    build_repository(root, ["simple", "simple_string"])
    with ServerThread(settings_for(root), [OnnxRuntime]) as server:
        yield server


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    from examples.build_python import build_python_repository
    from services.python.runtime import PythonRuntime

    root: Path = tmp_path_factory.mktemp("generate_python")
    build_python_repository(root, ["add_sub_python", "repeat_python", "text_stream_python"])
    with ServerThread(settings_for(root), [PythonRuntime]) as server:
        yield server


def _post(server: ServerThread, path: str, body: Any) -> tuple[int, str, bytes]:
    """POST ``body`` (JSON, or raw bytes) and read the whole answer: status, type, body."""
    host, port = server.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def _events(body: bytes) -> list[dict[str, Any]]:
    """The JSON objects of an SSE body's ``data:`` events."""
    events = []
    for block in body.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(json.loads(block[len("data: ") :]))
    return events


def _generate(server: ServerThread, model: str, body: Any, stream: bool = False) -> Any:
    suffix = "generate_stream" if stream else "generate"
    status, kind, data = _post(server, f"/v2/models/{model}/{suffix}", body)
    assert status == 200, data
    if stream:
        assert kind.startswith("text/event-stream")
        return _events(data)
    assert kind.startswith("application/json")
    return json.loads(data)


SIMPLE = {"INPUT0": list(range(16)), "INPUT1": [2] * 16}


def test_generate_answers_flat_json(onnx: ServerThread) -> None:
    doc = _generate(onnx, "simple", {**SIMPLE, "id": "req-7"})
    assert doc == {
        "model_name": "simple",
        "model_version": "1",
        "id": "req-7",
        "OUTPUT0": [x + 2 for x in range(16)],
        "OUTPUT1": [x - 2 for x in range(16)],
    }
    status, _, data = _post(onnx, "/v2/models/simple/versions/1/generate", SIMPLE)
    assert status == 200 and json.loads(data)["OUTPUT0"][0] == 2
    strings = _generate(
        onnx, "simple_string", {"INPUT0": [str(x) for x in range(16)], "INPUT1": [["1"] * 16]}
    )
    assert strings["OUTPUT0"] == [str(x + 1) for x in range(16)]


def test_generate_stream_of_a_model_that_is_not_decoupled_is_one_event(
    onnx: ServerThread, python: ServerThread
) -> None:
    (event,) = _generate(onnx, "simple", SIMPLE, stream=True)
    assert event["OUTPUT1"] == [x - 2 for x in range(16)]
    (event,) = _generate(
        python, "add_sub_python", {"INPUT0": [1, 2, 3, 4], "INPUT1": [0.5] * 4}, stream=True
    )
    assert event["OUTPUT0"] == [1.5, 2.5, 3.5, 4.5]


def test_a_decoupled_model_streams_one_event_per_response(python: ServerThread) -> None:
    events = _generate(python, "repeat_python", {"IN": [4, 5, 6]}, stream=True)
    assert [(e["OUT"], e["IDX"]) for e in events] == [(4, 0), (5, 1), (6, 2)]
    text = "tokens arrive one by one"
    events = _generate(python, "text_stream_python", {"text_input": text}, stream=True)
    assert [e["text_output"] for e in events] == ["tokens", " arrive", " one", " by", " one"]
    assert all(e["model_name"] == "text_stream_python" for e in events)


def test_parameters_come_from_the_object_and_from_extra_fields(python: ServerThread) -> None:
    body = {"text_input": "a b c d e", "parameters": {"max_tokens": 2}}
    assert len(_generate(python, "text_stream_python", body, stream=True)) == 2
    body = {"text_input": "a b c d e", "max_tokens": 3}
    assert len(_generate(python, "text_stream_python", body, stream=True)) == 3


def test_generate_takes_a_decoupled_models_single_response_and_refuses_several(
    python: ServerThread,
) -> None:
    assert _generate(python, "text_stream_python", {"text_input": "one"})["text_output"] == "one"
    status, _, data = _post(python, "/v2/models/repeat_python/generate", {"IN": [1, 2]})
    assert status == 400
    assert "several responses" in json.loads(data)["error"]
    assert "/generate_stream" in json.loads(data)["error"]
    status, _, data = _post(python, "/v2/models/repeat_python/generate", {"IN": []})
    assert status == 400 and "no response" in json.loads(data)["error"]


def test_an_error_after_the_first_event_ends_the_stream_with_an_error_event(
    python: ServerThread,
) -> None:
    status, _, data = _post(python, "/v2/models/repeat_python/generate_stream", {"IN": [3, -1]})
    assert status == 200
    events = _events(data)
    assert events[0]["OUT"] == 3
    assert "IN[1] is -1" in events[-1]["error"] and len(events) == 2


@pytest.mark.parametrize(
    ("model", "body", "status", "message"),
    [
        ("nope", SIMPLE, 404, "nope"),
        ("simple", {"INPUT0": list(range(16))}, 400, "has no field 'INPUT1'"),
        ("simple", {**SIMPLE, "INPUT1": [1, 2]}, 400, "2 value(s) cannot fill; send 16"),
        ("simple", {**SIMPLE, "INPUT1": ["x"] * 16}, 400, "must hold numbers"),
        ("simple", {**SIMPLE, "extra": {"a": 1}}, 400, "field 'extra'"),
        ("simple", {**SIMPLE, "parameters": {"p": [1]}}, 400, "request parameter 'p'"),
        ("simple", b"{not json", 400, "JSON"),
        ("simple", b"[1, 2]", 400, "object"),
        ("repeat_python", {"IN": [[1], [2, 3]]}, 400, "IN"),
    ],
)
def test_bad_requests_are_refused_and_the_service_keeps_serving(
    onnx: ServerThread,
    python: ServerThread,
    model: str,
    body: Any,
    status: int,
    message: str,
) -> None:
    server = python if model.endswith("_python") else onnx
    for suffix in ("generate", "generate_stream"):
        got, kind, data = _post(server, f"/v2/models/{model}/{suffix}", body)
        assert (got, kind.split(";")[0]) == (status, "application/json"), data
        assert message in json.loads(data)["error"]
    assert _generate(onnx, "simple", SIMPLE)["OUTPUT0"][0] == 2


def test_a_client_leaving_a_stream_leaves_the_service_serving(python: ServerThread) -> None:
    host, port = python.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"text_input": " ".join(["word"] * 50), "parameters": {"delay_ms": 50}}
    conn.request("POST", "/v2/models/text_stream_python/generate_stream", json.dumps(body))
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    conn.close()  # mid-stream
    events = _generate(python, "text_stream_python", {"text_input": "still here"}, stream=True)
    assert [e["text_output"] for e in events] == ["still", " here"]
