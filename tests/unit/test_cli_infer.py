"""`meshserve infer`: how inputs are built from the model's metadata and the command line."""

from __future__ import annotations

from typing import Any

import pytest

from deploy.infer import InferCommandError, build_request, render, run

SIMPLE = {
    "name": "simple",
    "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]},
    ],
}


def test_given_values_are_reshaped_and_broadcast() -> None:
    body = build_request(SIMPLE, True, {"INPUT0": str(list(range(16))), "INPUT1": "3"}, {}, batch=1)
    first, second = body["inputs"]
    assert first == {
        "name": "INPUT0",
        "datatype": "INT32",
        "shape": [1, 16],
        "data": list(range(16)),
    }
    assert second["shape"] == [1, 16] and second["data"] == [3] * 16


def test_missing_inputs_are_random_of_the_right_type_and_batch() -> None:
    meta = {
        "name": "m",
        "inputs": [
            {"name": "F", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "S", "datatype": "BYTES", "shape": [-1, 2]},
            {"name": "B", "datatype": "BOOL", "shape": [3]},
        ],
    }
    body = build_request(meta, True, {}, {}, batch=2, seed=7)
    f, s, b = body["inputs"]
    assert f["shape"] == [2, 4] and all(isinstance(v, float) and 0 <= v < 1 for v in f["data"])
    assert s["shape"] == [2, 2] and all(isinstance(v, str) and v.isdigit() for v in s["data"])
    assert b["shape"] == [3] and all(isinstance(v, bool) for v in b["data"])
    assert build_request(meta, True, {}, {}, batch=2, seed=7) == body  # the seed repeats it


def test_a_model_without_batching_keeps_its_shape_and_shape_overrides() -> None:
    meta = {"name": "m", "inputs": [{"name": "X", "datatype": "INT64", "shape": [-1, 3]}]}
    assert build_request(meta, False, {}, {})["inputs"][0]["shape"] == [1, 3]
    assert build_request(meta, False, {}, {"X": "5,3"})["inputs"][0]["shape"] == [5, 3]


@pytest.mark.parametrize(
    ("values", "shapes", "message"),
    [
        ({"INPUT0": "[1, 2, 3]"}, {}, "3 value(s) given, shape [1, 16] needs 16"),
        ({"NOPE": "1"}, {}, "has no input NOPE"),
        ({"INPUT0": '"x"'}, {}, "'x' is not a INT32 value"),
        ({}, {"INPUT0": "1,a"}, "give integers separated by commas"),
    ],
)
def test_bad_inputs_say_what_to_fix(
    values: dict[str, str], shapes: dict[str, str], message: str
) -> None:
    with pytest.raises(InferCommandError) as info:
        build_request(SIMPLE, True, values, shapes)
    assert message in str(info.value)


def test_run_asks_metadata_and_config_then_infers_and_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls: list[tuple[str, str, Any]] = []

    def call(url: str, method: str = "GET", body: Any = None) -> Any:
        calls.append((url, method, body))
        if url.endswith("/config"):
            return {"max_batch_size": 8}
        if url.endswith("/infer"):
            return {
                "model_name": "simple",
                "model_version": "2",
                "outputs": [
                    {"name": "OUTPUT0", "datatype": "INT32", "shape": [1, 2], "data": [4, 5]}
                ],
            }
        return SIMPLE

    assert run(call, "http://gw", "simple", "2", ["INPUT0=1"], [], 1, 0, False) == 0
    assert [c[0] for c in calls] == [
        "http://gw/v2/models/simple/versions/2",
        "http://gw/v2/models/simple/versions/2/config",
        "http://gw/v2/models/simple/versions/2/infer",
    ]
    assert calls[2][2]["inputs"][0]["data"] == [1] * 16
    out = capsys.readouterr().out
    assert "model simple version 2" in out and "OUTPUT0 INT32 [1, 2]: [[4, 5]]" in out
    with pytest.raises(SystemExit, match="--input 'INPUT0' is not NAME=VALUE"):
        run(call, "http://gw", "simple", "", ["INPUT0"], [], 1, 0, False)


def test_render_shortens_long_outputs() -> None:
    text = render(
        {
            "model_name": "m",
            "outputs": [{"name": "Y", "datatype": "FP32", "shape": [1000], "data": [0.5] * 1000}],
        }
    )
    assert "(1000 values)" in text and len(text) < 600
