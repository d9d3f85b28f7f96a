"""Load-time checks of ensemble configs (services/ensemble/graph.py) and in-mesh wire tensors."""

from __future__ import annotations

import numpy as np
import pytest

from protos.gen.inference import model_config_pb2 as mc
from services.core.config import parse_config_text
from services.core.errors import ModelLoadError
from services.core.gateway_client import WireTensor
from services.ensemble.graph import build_graph

ADD = parse_config_text(
    """name: "add" backend: "onnxruntime" max_batch_size: 8
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] },
            { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] optional: true } ]
    output [ { name: "Z" data_type: TYPE_FP32 dims: [ 4 ] } ]""",
    "add",
)
TO_INT = parse_config_text(
    """name: "to_int" backend: "python" max_batch_size: 8
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
    output [ { name: "I" data_type: TYPE_INT32 dims: [ 4 ] } ]""",
    "to_int",
)
SMALL_BATCH = parse_config_text(
    """name: "small_batch" backend: "onnxruntime" max_batch_size: 2
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
    output [ { name: "Z" data_type: TYPE_FP32 dims: [ 4 ] } ]""",
    "small_batch",
)
WIDE = parse_config_text(
    """name: "wide" backend: "onnxruntime" max_batch_size: 8
    input [ { name: "X" data_type: TYPE_FP32 dims: [ 5 ] } ]
    output [ { name: "Z" data_type: TYPE_FP32 dims: [ -1 ] } ]""",
    "wide",
)
#: a model whose config is auto-completed: it exists, its interface is unknown here
AUTO = mc.ModelConfig(name="auto")


def _lookup(extra: dict[str, mc.ModelConfig] | None = None):  # type: ignore[no-untyped-def]
    known = {"add": ADD, "to_int": TO_INT, "small_batch": SMALL_BATCH, "wide": WIDE, "auto": AUTO}
    known.update(extra or {})
    return known.get


def ensemble(steps: str, name: str = "ens", outputs: str = "", batch: int = 8) -> mc.ModelConfig:
    outputs = outputs or '{ name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] }'
    return parse_config_text(
        f"""name: "{name}" platform: "ensemble" max_batch_size: {batch}
        input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ 4 ] }} ]
        output [ {outputs} ]
        ensemble_scheduling {{ step [ {steps} ] }}""",
        name,
    )


def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'{{ model_name: "{model}" model_version: -1 {ins} {outs} }}'


def problem(config: mc.ModelConfig, extra: dict[str, mc.ModelConfig] | None = None) -> str:
    with pytest.raises(ModelLoadError) as err:
        build_graph(config, _lookup(extra))
    return err.value.message


def test_chain_is_ordered_by_dependencies() -> None:
    # written out of order: step 0 reads what step 1 writes
    config = ensemble(
        step("add", {"X": "MID"}, {"Z": "OUT"}) + "," + step("add", {"X": "IN"}, {"Z": "MID"})
    )
    graph = build_graph(config, _lookup())
    assert [s.index for s in graph.steps] == [1, 0]
    assert graph.input_types == {"IN": "FP32"}
    assert graph.outputs == ("OUT",)
    assert graph.steps[1].reads == {"MID"}


def test_version_minus_one_and_unset_mean_latest() -> None:
    config = ensemble(step("add", {"X": "IN"}, {"Z": "OUT"}))
    config.ensemble_scheduling.step[0].model_version = 3
    assert build_graph(config, _lookup()).steps[0].model_version == "3"
    config.ensemble_scheduling.step[0].model_version = 0
    assert build_graph(config, _lookup()).steps[0].model_version == ""


def test_unknown_step_model() -> None:
    msg = problem(ensemble(step("nope", {"X": "IN"}, {"Z": "OUT"})))
    assert "step 0 (model 'nope'): no model named 'nope'" in msg


def test_tensor_nobody_writes() -> None:
    msg = problem(ensemble(step("add", {"X": "GHOST"}, {"Z": "OUT"})))
    assert "step 0 (model 'add') reads tensor 'GHOST'" in msg


def test_tensor_written_twice() -> None:
    config = ensemble(
        step("add", {"X": "IN"}, {"Z": "OUT"}) + "," + step("add", {"X": "IN"}, {"Z": "OUT"})
    )
    assert "written by both step 0 (model 'add') and step 1 (model 'add')" in problem(config)


def test_step_overwriting_an_ensemble_input() -> None:
    config = ensemble(step("add", {"X": "IN"}, {"Z": "IN"}))
    assert "writes tensor 'IN', which is an ensemble input" in problem(config)


def test_unknown_input_and_output_names() -> None:
    msg = problem(ensemble(step("add", {"W": "IN"}, {"Z": "OUT"})))
    assert "maps 'W', which is not an input of 'add' (its inputs: X, Y)" in msg
    msg = problem(ensemble(step("add", {"X": "IN"}, {"Q": "OUT"})))
    assert "maps 'Q', which is not an output of 'add' (its outputs: Z)" in msg


def test_required_input_unmapped_but_optional_may_be() -> None:
    # Y is optional: leaving it out is fine
    build_graph(ensemble(step("add", {"X": "IN"}, {"Z": "OUT"})), _lookup())
    msg = problem(ensemble(step("to_int", {}, {"I": "OUT"})))
    assert "step 0 (model 'to_int') leaves the model's required input 'X' unmapped" in msg


def test_output_not_written_and_input_not_read() -> None:
    msg = problem(
        ensemble(
            step("add", {"X": "IN"}, {"Z": "OUT"}),
            outputs='{ name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] },'
            '{ name: "MORE" data_type: TYPE_FP32 dims: [ 4 ] }',
        )
    )
    assert "ensemble output 'MORE' is not written by any step" in msg
    config = ensemble(step("add", {"X": "IN"}, {"Z": "OUT"}))
    extra = config.input.add(name="UNUSED", data_type=mc.TYPE_FP32)
    extra.dims.append(4)
    assert "ensemble input 'UNUSED' is not read by any step" in problem(config)


def test_cycle_names_its_steps() -> None:
    config = ensemble(
        step("add", {"X": "IN"}, {"Z": "OUT"})
        + ","
        + step("add", {"X": "B"}, {"Z": "A"})
        + ","
        + step("add", {"X": "A"}, {"Z": "B"})
    )
    msg = problem(config)
    assert "steps form a cycle" in msg
    assert "step 1 (model 'add')" in msg and "step 2 (model 'add')" in msg
    assert "step 0" not in msg


def test_self_reference_and_nested_cycle() -> None:
    assert "calls the ensemble itself" in problem(ensemble(step("ens", {"X": "IN"}, {"Z": "OUT"})))
    inner = ensemble(step("ens", {"X": "IN"}, {"Z": "OUT"}), name="inner")
    msg = problem(ensemble(step("inner", {"X": "IN"}, {"Z": "OUT"})), {"inner": inner})
    assert "step 0 (model 'inner') is an ensemble that calls 'ens' back" in msg


def test_nested_ensemble_without_cycle_is_fine() -> None:
    inner = ensemble(step("add", {"X": "IN"}, {"Z": "OUT"}), name="inner")
    inner.input[0].name = "X"
    inner.ensemble_scheduling.step[0].input_map["X"] = "X"
    inner.output[0].name = "Z"
    inner.ensemble_scheduling.step[0].output_map["Z"] = "Z"
    graph = build_graph(
        ensemble(step("inner", {"X": "IN"}, {"Z": "OUT"})), _lookup({"inner": inner})
    )
    assert graph.steps[0].model_name == "inner"


def test_datatype_mismatch_names_both_ends() -> None:
    config = ensemble(
        step("to_int", {"X": "IN"}, {"I": "INTS"}) + "," + step("add", {"X": "INTS"}, {"Z": "OUT"})
    )
    msg = problem(config)
    assert "step 1 (model 'add') input 'X' expects FP32" in msg
    assert "tensor 'INTS' from step 0 (model 'to_int') output 'I' is INT32" in msg


def test_shape_mismatch_and_wildcards() -> None:
    msg = problem(ensemble(step("wide", {"X": "IN"}, {"Z": "OUT"})))
    assert "step 0 (model 'wide') input 'X' expects shape [-1, 5]" in msg
    assert "has shape [-1, 4]" in msg
    # an output of shape [-1] (any size) fits the ensemble's declared [4]
    config = ensemble(
        step("add", {"X": "IN"}, {"Z": "MID"}) + "," + step("add", {"X": "MID"}, {"Z": "OUT"})
    )
    build_graph(config, _lookup())


def test_ensemble_output_type_checked() -> None:
    config = ensemble(step("to_int", {"X": "IN"}, {"I": "OUT"}))
    assert "ensemble output 'OUT' expects FP32" in problem(config)


def test_batching_must_fit_every_step() -> None:
    msg = problem(ensemble(step("small_batch", {"X": "IN"}, {"Z": "OUT"})))
    assert "step 0 (model 'small_batch') has max_batch_size 2, below the ensemble's 8" in msg
    msg = problem(ensemble(step("add", {"X": "IN"}, {"Z": "OUT"}), batch=0))
    assert "batches (max_batch_size 8) but the ensemble does not" in msg


def test_auto_completed_step_is_checked_at_run_time_only() -> None:
    graph = build_graph(ensemble(step("auto", {"ANY": "IN"}, {"THING": "OUT"})), _lookup())
    assert graph.steps[0].inputs == (("ANY", "IN"),)


def test_wire_tensor_reuses_the_bytes_a_request_arrived_in() -> None:
    raw = np.arange(8, dtype=np.float32).tobytes()
    decoded = np.frombuffer(raw, dtype=np.float32).reshape(2, 4)
    wire = WireTensor.from_array("FP32", decoded)
    assert wire.raw is raw
    assert wire.shape == (2, 4)
    np.testing.assert_array_equal(wire.array("t"), decoded)
    # a slice or a computed array is serialised
    part = WireTensor.from_array("FP32", decoded[:, :2])
    assert part.raw == decoded[:, :2].tobytes()
    strings = WireTensor.from_array("BYTES", np.array([b"ab", b"c"], dtype=object))
    assert strings.raw == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    assert list(strings.array("s")) == [b"ab", b"c"]
