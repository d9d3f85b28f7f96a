"""Stateful model settings (sequences.py): sequence_batching checked, control and state tensors,
the config runtimes load, and auto-complete leaving the server's tensors out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core.autocomplete import complete_io
from services.core.errors import ModelLoadError
from services.core.requests import Array
from services.core.sequences import SequenceFlags, SequenceSettings, runtime_config


def config(section: str, max_batch_size: int = 0) -> mc.ModelConfig:
    text = f'name: "m" max_batch_size: {max_batch_size} sequence_batching {{ {section} }}'
    return text_format.Parse(text, mc.ModelConfig())


def control(name: str, kind: str, setting: str) -> str:
    return f'control_input {{ name: "{name}" control {{ kind: {kind} {setting} }} }}'


def settings(section: str, path: Path = Path("/nonexistent"), **kw: int) -> SequenceSettings:
    found = SequenceSettings.from_config(config(section, **kw), path)
    assert found is not None
    return found


def test_a_stateless_model_has_no_settings_and_keeps_its_config() -> None:
    plain = text_format.Parse('name: "m" dynamic_batching {}', mc.ModelConfig())
    assert SequenceSettings.from_config(plain, Path()) is None
    assert runtime_config(plain) is plain


def test_control_tensors_take_the_configured_values_and_types() -> None:
    s = settings(
        control("S", "CONTROL_SEQUENCE_START", "fp32_false_true: [ 0.5, 2 ]")
        + control("E", "CONTROL_SEQUENCE_END", "bool_false_true: [ false, true ]")
        + control("R", "CONTROL_SEQUENCE_READY", "int32_false_true: [ 7, 9 ]")
        + control("C", "CONTROL_SEQUENCE_CORRID", "data_type: TYPE_STRING"),
        max_batch_size=4,
    )
    tensors = s.model_inputs(SequenceFlags(12, start=True), None)
    assert tensors["S"].dtype == np.float32 and tensors["S"].tolist() == [[2.0]]
    assert tensors["E"].dtype == np.bool_ and tensors["E"].tolist() == [[False]]
    assert tensors["R"].dtype == np.int32 and tensors["R"].tolist() == [[9]]
    assert tensors["C"].tolist() == [[b"12"]]
    unbatched = settings(control("S", "CONTROL_SEQUENCE_START", "int32_false_true: [0, 1]"))
    assert unbatched.model_inputs(SequenceFlags("x"), None)["S"].tolist() == [0]


def test_state_starts_from_zeros_or_its_initial_file_and_resets_on_start(tmp_path: Path) -> None:
    (tmp_path / "initial_state").mkdir()
    np.array([1.5, -2], np.float32).tofile(tmp_path / "initial_state" / "h0")
    s = settings(
        'state { input_name: "H_IN" output_name: "H_OUT" data_type: TYPE_FP32 dims: [ 2 ] '
        'initial_state { data_type: TYPE_FP32 dims: [ 2 ] data_file: "h0" name: "h" } } '
        'state { input_name: "N_IN" output_name: "N_OUT" data_type: TYPE_INT64 dims: [ 1 ] }',
        tmp_path,
        max_batch_size=2,
    )
    assert s.added_inputs == ("H_IN", "N_IN") and s.state_outputs == ("H_OUT", "N_OUT")
    first = s.model_inputs(SequenceFlags(1, start=True), None)
    assert first["H_IN"].tolist() == [[1.5, -2.0]] and first["N_IN"].tolist() == [[0]]
    held: dict[str, Array] = {
        "H_OUT": np.array([3, 4], np.float32),
        "N_OUT": np.array([5], np.int64),
    }
    assert s.model_inputs(SequenceFlags(1), held)["N_IN"].tolist() == [[5]]
    assert s.model_inputs(SequenceFlags(1, start=True), held)["N_IN"].tolist() == [[0]]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (control("S", "CONTROL_SEQUENCE_START", ""), "needs exactly one of int32_false_true"),
        (
            control(
                "S", "CONTROL_SEQUENCE_START", "int32_false_true: [0, 1] fp32_false_true: [0, 1]"
            ),
            "needs exactly one of",
        ),
        (control("S", "CONTROL_SEQUENCE_END", "int32_false_true: [1]"), "with two values"),
        (control("C", "CONTROL_SEQUENCE_CORRID", "data_type: TYPE_FP32"), "TYPE_UINT64"),
        ('state { input_name: "A" data_type: TYPE_FP32 dims: [1] }', "both input_name and"),
        ('state { input_name: "A" output_name: "B" data_type: TYPE_FP32 }', "must set dims"),
        (
            'state { input_name: "A" output_name: "B" data_type: TYPE_FP32 dims: [-1] }',
            "variable dims",
        ),
        (
            'state { input_name: "A" output_name: "B" data_type: TYPE_FP32 dims: [2] '
            'initial_state { data_type: TYPE_FP32 dims: [2] data_file: "missing" } }',
            "cannot read initial_state file",
        ),
        ("iterative_sequence: true", "iterative_sequence is not supported"),
    ],
)
def test_bad_sections_fail_the_load_with_the_reason(section: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        SequenceSettings.from_config(config(section), Path("/nonexistent"))


def test_strategies_set_slots_and_delays() -> None:
    direct = settings(
        "direct { max_queue_delay_microseconds: 300 minimum_slot_utilization: 0.5 }",
        max_batch_size=8,
    )
    assert (direct.strategy, direct.slots_per_instance, direct.max_queue_delay_ns) == (
        "direct",
        8,
        300_000,
    )
    # without a minimum slot utilization, direct's delay does not apply (as in Triton)
    assert settings("direct { max_queue_delay_microseconds: 300 }").max_queue_delay_ns == 0
    oldest = settings(
        "oldest { max_candidate_sequences: 16 preferred_batch_size: [4, 2] }", max_batch_size=4
    )
    assert (oldest.strategy, oldest.slots_per_instance, oldest.preferred_batch_sizes) == (
        "oldest",
        16,
        (2, 4),
    )


def test_runtimes_load_the_control_and_state_tensors_as_inputs_and_outputs() -> None:
    user = config(
        control("START", "CONTROL_SEQUENCE_START", "bool_false_true: [false, true]")
        + control("ID", "CONTROL_SEQUENCE_CORRID", "data_type: TYPE_UINT64")
        + 'state { input_name: "S_IN" output_name: "S_OUT" data_type: TYPE_FP16 dims: [3] }',
        max_batch_size=2,
    )
    user.input.add(name="X", data_type=mc.TYPE_FP32, dims=[4])
    loaded = runtime_config(user)
    assert [(i.name, i.data_type, list(i.dims)) for i in loaded.input] == [
        ("X", mc.TYPE_FP32, [4]),
        ("START", mc.TYPE_BOOL, [1]),
        ("ID", mc.TYPE_UINT64, [1]),
        ("S_IN", mc.TYPE_FP16, [3]),
    ]
    assert [o.name for o in loaded.output] == ["S_OUT"]
    assert [i.name for i in user.input] == ["X"]  # the user's config is left as it was


class _Tensor:
    def __init__(self, name: str) -> None:
        self.name, self.data_type, self.batchable, self.rank = name, mc.TYPE_INT32, True, 2

    def dims(self, batching: bool) -> list[int]:
        return [1]


def test_auto_complete_leaves_the_servers_tensors_out() -> None:
    user = config(
        control("START", "CONTROL_SEQUENCE_START", "int32_false_true: [0, 1]")
        + 'state { input_name: "S_IN" output_name: "S_OUT" data_type: TYPE_INT32 dims: [1] }',
        max_batch_size=4,
    )
    complete_io(
        user,
        [_Tensor(n) for n in ("INPUT", "START", "S_IN")],
        [_Tensor(n) for n in ("OUTPUT", "S_OUT")],
        platform="onnxruntime_onnx",
        backend="onnxruntime",
    )
    assert [i.name for i in user.input] == ["INPUT"]
    assert [o.name for o in user.output] == ["OUTPUT"]
    assert not user.HasField("dynamic_batching")
