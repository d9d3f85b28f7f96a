"""Ragged batching (services/core/ragged.py): config checks, the runtime's view of the config,
every batch_input kind, scattered outputs, and the batch signature that lets ragged requests
share a batch."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core import ragged
from services.core.config import apply_defaults, validate_config
from services.core.errors import InternalError, ModelLoadError
from services.core.model_prep import loaded_config
from services.core.requests import InferRequest
from services.core.runtime import Runtime
from services.core.validation import RequestValidator
from services.onnx.runtime import OnnxRuntime
from services.python.runtime import PythonRuntime

BASE = """
name: "m"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""


def config(extra: str = "", base: str = BASE) -> mc.ModelConfig:
    return text_format.Parse(base + extra, mc.ModelConfig())


def check(text: mc.ModelConfig) -> None:
    """The load-time validation a repository's config goes through."""
    apply_defaults(text)
    validate_config(text, "m")


def batch_input(kind: str, target: str = "B", dtype: str = "TYPE_INT32") -> str:
    return (
        f'batch_input [ {{ kind: {kind} target_name: "{target}" data_type: {dtype} '
        'source_input: "INPUT" } ]'
    )


def request(*shape: int, start: float = 0.0) -> InferRequest:
    data = (np.arange(int(np.prod(shape)), dtype=np.float32) + start).reshape(shape)
    return InferRequest("m", "", {"INPUT": data})


# -- the proto's own examples, one per kind: requests [2, 3] then [1, 5] -----------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("BATCH_ELEMENT_COUNT", [6, 5]),
        ("BATCH_ACCUMULATED_ELEMENT_COUNT", [6, 11]),
        ("BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO", [0, 6, 11]),
        ("BATCH_ITEM_SHAPE", [[3], [3], [5]]),
        ("BATCH_ITEM_SHAPE_FLATTEN", [3, 3, 5]),
    ],
)
def test_batch_input_values(kind: str, expected: list[object]) -> None:
    layout = ragged.BatchLayout(config(batch_input(kind)))
    inputs = layout.gather([request(2, 3), request(1, 5)])
    assert inputs["B"].dtype == np.int32
    np.testing.assert_array_equal(inputs["B"], np.array(expected, dtype=np.int32))


def test_max_element_count_gives_only_a_shape() -> None:
    layout = ragged.BatchLayout(config(batch_input("BATCH_MAX_ELEMENT_COUNT_AS_SHAPE")))
    inputs = layout.gather([request(1, 3), request(1, 7), request(1, 2)])
    assert inputs["B"].shape == (7,)


def test_item_shape_of_a_two_dimensional_input_as_in_model_config_proto() -> None:
    """The proto's example: a batch-2 request of item shape [3, 1] and a batch-1 request of
    item shape [2, 2] give [[3, 1], [3, 1], [2, 2]] (FLATTEN: [3, 1, 3, 1, 2, 2])."""
    two_d = BASE.replace("dims: [ -1 ] allow", "dims: [ -1, -1 ] allow")
    item = config(batch_input("BATCH_ITEM_SHAPE", "S", "TYPE_FP32"), two_d)
    flat = config(batch_input("BATCH_ITEM_SHAPE_FLATTEN", "S"), two_d)
    batch = [request(2, 3, 1), request(1, 2, 2)]
    shapes = ragged.BatchLayout(item).gather(batch)["S"]
    assert shapes.dtype == np.float32
    np.testing.assert_array_equal(shapes, [[3, 1], [3, 1], [2, 2]])
    np.testing.assert_array_equal(ragged.BatchLayout(flat).gather(batch)["S"], [3, 1, 3, 1, 2, 2])


def test_ragged_inputs_are_flattened_and_joined_the_rest_concatenated() -> None:
    extra = 'input [ { name: "SCALE" data_type: TYPE_FP32 dims: [ 2 ] } ]'
    layout = ragged.BatchLayout(config(extra))
    a, b = request(1, 3), request(2, 2, start=10)
    a.inputs["SCALE"] = np.ones((1, 2), np.float32)
    b.inputs["SCALE"] = np.zeros((2, 2), np.float32)
    inputs = layout.gather([a, b])
    np.testing.assert_array_equal(inputs["INPUT"], [0, 1, 2, 10, 11, 12, 13])
    assert inputs["SCALE"].shape == (3, 2)
    # one request alone is flattened too: the model always sees the ragged input 1-D
    assert layout.gather([request(1, 4)])["INPUT"].shape == (4,)


def test_every_target_name_gets_the_batch_input() -> None:
    text = (
        'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: ["C1", "C2"] '
        'data_type: TYPE_INT32 source_input: "INPUT" } ]'
    )
    inputs = ragged.BatchLayout(config(text)).gather([request(1, 2)])
    np.testing.assert_array_equal(inputs["C1"], [2])
    np.testing.assert_array_equal(inputs["C2"], [2])


# -- outputs -----------------------------------------------------------------------------------

SCATTER = (
    'batch_output [ { target_name: "OUT" kind: BATCH_SCATTER_WITH_INPUT_SHAPE '
    'source_input: "INPUT" } ]\n'
    'output [ { name: "PER_ITEM" data_type: TYPE_FP32 dims: [ 1 ] } ]'
)


def test_scattered_output_takes_each_requests_input_shape() -> None:
    layout = ragged.BatchLayout(config(SCATTER))
    batch = [request(1, 3), request(2, 2)]
    results = {
        "OUT": np.arange(7, dtype=np.float32),
        "PER_ITEM": np.array([[1], [2], [3]], np.float32),
    }
    first, second = layout.split(results, ["OUT", "PER_ITEM"], batch, [1, 2])
    np.testing.assert_array_equal(first["OUT"], [[0, 1, 2]])
    np.testing.assert_array_equal(second["OUT"], [[3, 4], [5, 6]])
    np.testing.assert_array_equal(first["PER_ITEM"], [[1]])
    np.testing.assert_array_equal(second["PER_ITEM"], [[2], [3]])
    alone = layout.split({"OUT": np.arange(3, dtype=np.float32)}, ["OUT"], [request(1, 3)], [1])
    assert alone[0]["OUT"].shape == (1, 3)


def test_scattered_output_keeps_its_fixed_dims() -> None:
    """Output dims [-1, 4]: per token of INPUT, 4 values; request [1, 3] gets [1, 3, 4]."""
    text = SCATTER.replace(
        'name: "PER_ITEM" data_type: TYPE_FP32 dims: [ 1 ]',
        'name: "X" data_type: TYPE_FP32 dims: [ 1 ]',
    )
    base = BASE.replace(
        'name: "OUT" data_type: TYPE_FP32 dims: [ -1 ]',
        'name: "OUT" data_type: TYPE_FP32 dims: [ -1, 4 ]',
    )
    layout = ragged.BatchLayout(config(text, base))
    parts = layout.split(
        {"OUT": np.arange(20, dtype=np.float32)}, ["OUT"], [request(1, 3), request(1, 2)], [1, 1]
    )
    assert parts[0]["OUT"].shape == (1, 3, 4)
    np.testing.assert_array_equal(parts[1]["OUT"].reshape(-1), np.arange(12, 20))


def test_a_scattered_output_of_the_wrong_size_fails_the_batch() -> None:
    layout = ragged.BatchLayout(config(SCATTER))
    with pytest.raises(InternalError, match="'OUT' has 6 elements; scattered by input 'INPUT'"):
        layout.split(
            {"OUT": np.zeros(6, np.float32), "PER_ITEM": np.zeros((2, 1), np.float32)},
            ["OUT", "PER_ITEM"],
            [request(1, 3), request(1, 4)],
            [1, 1],
        )
    with pytest.raises(InternalError, match="returned no value for 'OUT'"):
        layout.split(
            {"PER_ITEM": np.zeros((2, 1), np.float32)},
            ["OUT", "PER_ITEM"],
            [request(1, 3), request(1, 4)],
            [1, 1],
        )


# -- signatures: ragged requests share a batch, others still do not ------------------------------


def test_ragged_input_does_not_split_the_batch_but_other_inputs_do() -> None:
    extra = 'input [ { name: "SCALE" data_type: TYPE_FP32 dims: [ -1 ] } ]'
    validate = RequestValidator(config(extra))

    def signature(length: int, scale: int) -> object:
        req = request(1, length)
        req.inputs["SCALE"] = np.ones((1, scale), np.float32)
        return validate(req)[1]

    assert signature(3, 2) == signature(5, 2)
    assert signature(3, 2) != signature(3, 4)
    plain = RequestValidator(config(base=BASE.replace(" allow_ragged_batch: true", "")))
    assert plain(request(1, 3))[1] != plain(request(1, 5))[1]


def test_ragged_input_is_still_checked_against_its_dims() -> None:
    from services.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="unexpected shape for input 'INPUT'"):
        RequestValidator(config())(request(1, 2, 2))


# -- the config the runtime loads with ------------------------------------------------------------


def test_runtime_view_flattens_ragged_inputs_and_adds_batch_inputs() -> None:
    text = batch_input("BATCH_ACCUMULATED_ELEMENT_COUNT", "INDEX") + "\n" + SCATTER
    text = text.replace(
        "batch_input [",
        'batch_input [ { kind: BATCH_ITEM_SHAPE target_name: "SHAPES" data_type: TYPE_INT32 source_input: "INPUT" },',
        1,
    )
    view = ragged.runtime_view(config(text))
    inputs = {io.name: list(io.dims) for io in view.input}
    assert inputs == {"INPUT": [], "SHAPES": [1], "INDEX": []}  # the runtime adds [-1] first
    out = next(o for o in view.output if o.name == "OUT")
    assert out.HasField("reshape") and list(out.reshape.shape) == []
    assert not next(o for o in view.output if o.name == "PER_ITEM").HasField("reshape")
    unbatched = config(
        batch_input("BATCH_ITEM_SHAPE", "SHAPES"),
        BASE.replace("max_batch_size: 8", "max_batch_size: 0"),
    )
    view = ragged.runtime_view(unbatched)
    assert {io.name: list(io.dims) for io in view.input} == {"INPUT": [-1], "SHAPES": [-1, 1]}
    plain = config(base=BASE.replace(" allow_ragged_batch: true", ""))
    assert ragged.runtime_view(plain) is plain


def test_runtimes_that_take_requests_one_by_one_refuse_batch_inputs() -> None:
    with_input = config(batch_input("BATCH_ELEMENT_COUNT"))
    with pytest.raises(ModelLoadError, match="python backend gets each request on its own"):
        loaded_config(with_input, PythonRuntime)
    assert loaded_config(config(), PythonRuntime) is not None  # ragged alone is fine
    runtime: type[Runtime] = OnnxRuntime
    assert [io.name for io in loaded_config(with_input, runtime).input] == ["INPUT", "B"]


# -- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "INPUT" data_type: TYPE_INT32 source_input: "INPUT" } ]',
            r"target_name \['INPUT'\] is also declared in 'input'",
        ),
        (batch_input("BATCH_ELEMENT_COUNT", dtype="TYPE_INT64"), "must be TYPE_INT32 or TYPE_FP32"),
        (
            'batch_input [ { kind: BATCH_ELEMENT_COUNT data_type: TYPE_INT32 source_input: "INPUT" } ]',
            "a batch_input needs a target_name",
        ),
        (
            'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "B" data_type: TYPE_INT32 source_input: "NOPE" } ]',
            r"source_input \['NOPE'\] is not a declared input",
        ),
        (
            batch_input("BATCH_ELEMENT_COUNT", "B") + batch_input("BATCH_ELEMENT_COUNT", "B"),
            "repeats a name",
        ),
        (
            'batch_output [ { target_name: "NOPE" source_input: "INPUT" } ]',
            r"target_name \['NOPE'\] is not a declared output",
        ),
        (
            'output [ { name: "WIDE" data_type: TYPE_FP32 dims: [ 2, -1 ] } ]\n'
            'batch_output [ { target_name: "WIDE" source_input: "INPUT" } ]',
            "have a -1 at a position that input 'INPUT'",
        ),
    ],
)
def test_config_problems(extra: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        check(config(extra))


def test_optional_source_is_refused() -> None:
    text = BASE.replace("allow_ragged_batch: true", "allow_ragged_batch: true optional: true")
    with pytest.raises(ModelLoadError, match="from optional input 'INPUT'"):
        check(config(batch_input("BATCH_ELEMENT_COUNT"), text))


def test_a_valid_ragged_config_passes() -> None:
    check(config(batch_input("BATCH_ACCUMULATED_ELEMENT_COUNT") + "\n" + SCATTER))
