"""Load-time rules for ensembles with decoupled steps (services/ensemble/graph.py), as Triton's
ensemble_utils.cc applies them: the ensemble is decoupled exactly when a step is, and a step (or
the ensemble's output set) may only combine tensors that come from the same decoupled response."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from protos.gen.inference import model_config_pb2 as mc
from services.core.config import parse_config_text
from services.ensemble.graph import build_graph, is_decoupled
from services.ensemble.runtime import EnsembleRuntime
from tests.unit.test_ensemble_graph import ADD, ensemble, problem, step

#: ``add`` as a decoupled model: any number of responses per request
STREAM = mc.ModelConfig()
STREAM.CopyFrom(ADD)
STREAM.name = "stream"
STREAM.model_transaction_policy.decoupled = True

TWO_OUT = '{ name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] }, ' + (
    '{ name: "OUT2" data_type: TYPE_FP32 dims: [ 4 ] }'
)


def _lookup(
    extra: dict[str, mc.ModelConfig] | None = None,
) -> Callable[[str], mc.ModelConfig | None]:
    known = {"add": ADD, "stream": STREAM, **(extra or {})}
    return known.get


def decoupled(config: mc.ModelConfig) -> mc.ModelConfig:
    config.model_transaction_policy.decoupled = True
    return config


def test_decoupled_step_then_a_step_per_response() -> None:
    config = decoupled(
        ensemble(
            step("stream", {"X": "IN"}, {"Z": "MID"})
            + ","
            + step("add", {"X": "MID"}, {"Z": "OUT"})
        )
    )
    graph = build_graph(config, _lookup())
    assert graph.decoupled
    first, second = graph.steps
    assert (first.decoupled, first.origin) == (True, None)
    assert (second.decoupled, second.origin) == (False, 0)
    assert graph.output_origin == 0


def test_plain_ensemble_has_no_origins() -> None:
    graph = build_graph(ensemble(step("add", {"X": "IN"}, {"Z": "OUT"})), _lookup())
    assert not graph.decoupled
    assert graph.output_origin is None
    assert graph.steps[0].origin is None


def test_ensemble_not_marked_decoupled_says_what_to_set() -> None:
    config = ensemble(step("stream", {"X": "IN"}, {"Z": "OUT"}))
    msg = problem(config, {"stream": STREAM})
    assert "step 0 (model 'stream') is decoupled" in msg
    assert "model_transaction_policy { decoupled: true }" in msg
    assert "ModelStreamInfer" in msg


def test_is_decoupled_follows_steps_and_nested_ensembles() -> None:
    assert is_decoupled(ensemble(step("stream", {"X": "IN"}, {"Z": "OUT"})), _lookup())
    assert not is_decoupled(ensemble(step("add", {"X": "IN"}, {"Z": "OUT"})), _lookup())
    # a nested ensemble as read from its file does not say decoupled; its step does
    inner = ensemble(step("stream", {"X": "IN"}, {"Z": "OUT"}), name="inner")
    outer = ensemble(step("inner", {"X": "IN"}, {"Z": "OUT"}))
    assert is_decoupled(outer, _lookup({"inner": inner}))
    # a cycle does not loop (build_graph refuses it)
    looped = ensemble(step("ens", {"X": "IN"}, {"Z": "OUT"}), name="looped")
    assert not is_decoupled(
        ensemble(step("looped", {"X": "IN"}, {"Z": "OUT"})), _lookup({"looped": looped})
    )


def test_step_mixing_a_response_with_an_ensemble_input_is_refused() -> None:
    config = decoupled(
        ensemble(
            step("stream", {"X": "IN"}, {"Z": "MID"})
            + ","
            + step("add", {"X": "MID", "Y": "IN"}, {"Z": "OUT"})
        )
    )
    msg = problem(config, {"stream": STREAM})
    assert "step 1 (model 'add') combines tensors of different decoupled responses" in msg
    assert "'IN' (once per request)" in msg
    assert "'MID' (once per response of decoupled step 0 (model 'stream'))" in msg


def test_outputs_from_different_responses_are_refused() -> None:
    # OUT once per request, OUT2 once per response: they cannot form one ensemble response
    config = decoupled(
        ensemble(
            step("add", {"X": "IN"}, {"Z": "OUT"})
            + ","
            + step("stream", {"X": "IN"}, {"Z": "OUT2"}),
            outputs=TWO_OUT,
        )
    )
    msg = problem(config, {"stream": STREAM})
    assert "the ensemble's output set combines tensors of different decoupled responses" in msg


def test_two_decoupled_steps_in_a_row() -> None:
    config = decoupled(
        ensemble(
            step("stream", {"X": "IN"}, {"Z": "A"})
            + ","
            + step("stream", {"X": "A"}, {"Z": "B"})
            + ","
            + step("add", {"X": "B"}, {"Z": "OUT"})
        )
    )
    graph = build_graph(config, _lookup())
    assert [(s.index, s.origin) for s in graph.steps] == [(0, None), (1, 0), (2, 1)]
    assert graph.output_origin == 1
    # combining the first stream's tensor with the second's is refused
    config.ensemble_scheduling.step[2].input_map["Y"] = "A"
    assert "different decoupled responses" in problem(config, {"stream": STREAM})


def test_two_outputs_of_one_response_may_be_combined() -> None:
    pair = parse_config_text(
        """name: "pair" backend: "python" max_batch_size: 8
        model_transaction_policy { decoupled: true }
        input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "P" data_type: TYPE_FP32 dims: [ 4 ] },
                 { name: "Q" data_type: TYPE_FP32 dims: [ 4 ] } ]""",
        "pair",
    )
    config = decoupled(
        ensemble(
            step("pair", {"X": "IN"}, {"P": "P", "Q": "Q"})
            + ","
            + step("add", {"X": "P", "Y": "Q"}, {"Z": "OUT"})
        )
    )
    graph = build_graph(config, _lookup({"pair": pair}))
    assert graph.steps[1].origin == 0


def test_autocomplete_fills_decoupled_from_the_steps(tmp_path: Path) -> None:
    """As Triton: the ensemble's decoupled flag follows its steps, whatever its file says."""
    (tmp_path / "stream").mkdir()
    (tmp_path / "stream" / "config.pbtxt").write_text(
        'name: "stream" backend: "python" model_transaction_policy { decoupled: true }'
    )
    (tmp_path / "add").mkdir()
    (tmp_path / "add" / "config.pbtxt").write_text('name: "add" backend: "onnxruntime"')
    version = tmp_path / "ens" / "1"
    version.mkdir(parents=True)
    config = ensemble(step("stream", {"X": "IN"}, {"Z": "OUT"}))
    EnsembleRuntime.autocomplete(config, version)
    assert config.model_transaction_policy.decoupled
    plain = decoupled(ensemble(step("add", {"X": "IN"}, {"Z": "OUT"})))
    EnsembleRuntime.autocomplete(plain, version)
    assert not plain.model_transaction_policy.decoupled


def test_decoupled_is_derived_with_auto_complete_off_too(tmp_path: Path) -> None:
    """--disable-auto-complete-config stops completing configs, not this derivation (Triton
    sets an ensemble's decoupled policy from its steps either way)."""
    from google.protobuf import text_format

    from services.core import repository as repo
    from services.core.model_prep import prepare_config

    (tmp_path / "stream").mkdir()
    (tmp_path / "stream" / "config.pbtxt").write_text(
        'name: "stream" backend: "python" model_transaction_policy { decoupled: true }'
    )
    (tmp_path / "ens" / "1").mkdir(parents=True)
    config = ensemble(step("stream", {"X": "IN"}, {"Z": "OUT"}))
    config.name = "ens"
    (tmp_path / "ens" / "config.pbtxt").write_text(text_format.MessageToString(config))
    prepared = prepare_config(
        [EnsembleRuntime], "ens", repo.scan_model(tmp_path / "ens"), None, auto_complete=False
    )
    assert prepared is not None
    assert prepared[0].model_transaction_policy.decoupled
