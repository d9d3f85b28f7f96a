"""Checks every family's stateful accumulator example passes in its service's integration tests
(simple_sequence_torch, simple_sequence_tf): INT32 [1] in, the running sum of the sequence out."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient

#: (sequence, input, start, end, expected output); 41 restarts midway: START resets
INTERLEAVED: list[tuple[int | str, int, bool, bool, int]] = [
    (41, 3, True, False, 3),
    ("seq-b", 10, True, False, 10),
    (41, 4, False, False, 7),
    ("seq-b", -2, False, False, 8),
    (41, 5, True, False, 5),
    ("seq-b", 1, False, True, 9),
    (41, 6, False, True, 11),
]


def sequence_step(
    client: grpcclient.InferenceServerClient,
    model: str,
    io: tuple[str, str],
    step: tuple[int | str, int, bool, bool],
) -> int:
    """One request of a sequence to ``model`` (input and output names ``io``); its output."""
    sid, value, start, end = step
    inp = grpcclient.InferInput(io[0], [1, 1], "INT32")
    inp.set_data_from_numpy(np.array([[value]], np.int32))
    result = client.infer(model, [inp], sequence_id=sid, sequence_start=start, sequence_end=end)
    out = result.as_numpy(io[1])
    assert out is not None and out.shape == (1, 1)
    return int(out[0, 0])


def check_interleaved_sums(
    client: grpcclient.InferenceServerClient, model: str, io: tuple[str, str]
) -> None:
    """Two interleaved sequences, one restarted, each keep their own running sum."""
    got = [sequence_step(client, model, io, step[:4]) for step in INTERLEAVED]
    assert got == [step[4] for step in INTERLEAVED]


def check_user_tensors_only(
    client: grpcclient.InferenceServerClient,
    model: str,
    io: tuple[str, str],
    controls: list[str],
) -> None:
    """Metadata and config list the user's tensors, not the control and state ones."""
    meta = client.get_model_metadata(model, as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        (io[0], "INT32", ["-1", "1"])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        (io[1], "INT32", ["-1", "1"])
    ]
    config = client.get_model_config(model, as_json=True)["config"]
    assert [t["name"] for t in config["input"]] == [io[0]]
    assert [t["name"] for t in config["output"]] == [io[1]]
    assert [c["name"] for c in config["sequence_batching"]["control_input"]] == controls
