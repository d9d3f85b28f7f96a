"""The Python backend: PythonRuntime driving a user's model.py directly (initialize's args,
execute over several requests, errors at load and at execute, the examples). The pb_utils
module and BLS: test_pb_utils.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from examples.build_python import DTYPES_DATATYPES, build_python_repository
from services.core.errors import InternalError, InvalidArgument, ModelLoadError, ServingError
from services.core.requests import InferRequest, RequestedOutput
from services.python.runtime import PythonRuntime
from tests.datatype_samples import ALL_DATATYPES, assert_identical, edge_values, kit_form
from tests.unit.python_backend_support import CPU, RECORDING_MODEL, _config, _write


def _request(x: list[list[float]], rid: str = "", **params: bool) -> InferRequest:
    return InferRequest(
        "rec", "", {"X": np.array(x, dtype=np.float32)}, id=rid, parameters=dict(params)
    )


# --- PythonRuntime --------------------------------------------------------------------------


def test_initialize_gets_triton_args(tmp_path: Path) -> None:
    path = _write(tmp_path, RECORDING_MODEL)
    runtime = PythonRuntime(_config(), path, CPU)
    args = json.loads((path.parent / "args.json").read_text())
    assert args["model_name"] == "rec"
    assert args["model_version"] == "1"
    assert args["model_repository"] == str(tmp_path / "rec")
    assert args["model_instance_kind"] == "CPU"
    assert args["model_instance_name"] == "m_0"
    assert args["model_instance_device_id"] == "0"
    config = json.loads(args["model_config"])
    assert config["max_batch_size"] == 4
    assert config["input"][0]["dims"] == [2]  # numbers, as in Triton's JSON
    assert config["output"][1]["data_type"] == "TYPE_STRING"
    assert "optional" in config["input"][0]  # every field present, defaults too
    runtime.unload()


def test_several_requests_one_execute_and_per_request_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, RECORDING_MODEL)
    runtime = PythonRuntime(_config(), path, CPU)
    requests = [
        _request([[1, 2]], "a"),
        _request([[0, 0]], fail=True),
        _request([[3, 4], [5, 6]], "c"),
    ]
    requests[2].outputs = [RequestedOutput("Y")]
    first, second, third = runtime.infer_requests(requests, ["Y", "T"])
    assert isinstance(first, dict)
    np.testing.assert_array_equal(first["Y"], [[2, 4]])
    assert first["T"].tolist() == [[b"a"]]  # str elements come back as UTF-8 bytes
    assert isinstance(second, InvalidArgument) and second.message == "bad value"
    assert isinstance(third, dict) and set(third) == {"Y"}
    np.testing.assert_array_equal(third["Y"], [[6, 8], [10, 12]])
    runtime.unload()
    assert (path.parent / "finalized").read_text() == "[3]"


def test_infer_runs_the_batch_as_one_request(tmp_path: Path) -> None:
    runtime = PythonRuntime(_config(), _write(tmp_path, RECORDING_MODEL), CPU)
    out = runtime.infer({"X": np.ones((3, 2), dtype=np.float32)}, ["Y", "T"])
    assert out["Y"].shape == (3, 2)
    assert out["T"].dtype == object


def test_execute_exception_reaches_caller_with_its_text(tmp_path: Path) -> None:
    model = """
    class TritonPythonModel:
        def execute(self, requests):
            raise ValueError("boom")
    """
    runtime = PythonRuntime(_config(), _write(tmp_path, model), CPU)
    with pytest.raises(InternalError, match="execute raised ValueError: boom"):
        runtime.infer_requests([_request([[1, 2]])], ["Y"])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("return []", "one InferenceResponse per request"),
        (
            "return [pb_utils.InferenceResponse([pb_utils.Tensor('Y', np.zeros((1, 2)))])]",
            "float64 but the config declares TYPE_FP32",
        ),
        ("return [pb_utils.InferenceResponse([])]", "no output 'Y'"),
        (
            "return [pb_utils.InferenceResponse([pb_utils.Tensor('Y', np.zeros((5, 2), 'f4'))])]",
            "batch dimension 1",
        ),
    ],
)
def test_malformed_responses_are_named(tmp_path: Path, body: str, expected: str) -> None:
    model = f"""
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            {body}
    """
    runtime = PythonRuntime(_config(), _write(tmp_path, model), CPU)
    try:
        (result,) = runtime.infer_requests([_request([[1, 2]])], ["Y"])
    except ServingError as err:
        result = err
    assert isinstance(result, InternalError)
    assert expected in result.message


def test_initialize_exception_is_a_load_error(tmp_path: Path) -> None:
    build_python_repository(tmp_path, ["bad_init_python"])
    config = _config((tmp_path / "bad_init_python" / "config.pbtxt").read_text())
    with pytest.raises(ModelLoadError, match="initialize raised RuntimeError: weights file"):
        PythonRuntime(config, tmp_path / "bad_init_python" / "1" / "model.py", CPU)


def test_missing_class_or_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no class TritonPythonModel"):
        PythonRuntime(_config(), _write(tmp_path, "x = 1\n"), CPU)
    with pytest.raises(ModelLoadError, match="does not exist"):
        PythonRuntime(_config(), tmp_path / "none" / "1" / "model.py", CPU)
    with pytest.raises(ModelLoadError, match=r"importing .* raised SyntaxError"):
        PythonRuntime(_config(), _write(tmp_path, "def (\n"), CPU)


def test_instances_do_not_share_module_state(tmp_path: Path) -> None:
    model = """
    import numpy as np
    import triton_python_backend_utils as pb_utils
    COUNT = [0]

    class TritonPythonModel:
        def execute(self, requests):
            COUNT[0] += 1
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "Y", np.full((1, 2), COUNT[0], np.float32))]) for r in requests]
    """
    path = _write(tmp_path, model)
    a = PythonRuntime(_config(), path, CPU)
    b = PythonRuntime(_config(), path, CPU)
    a.infer({"X": np.zeros((1, 2), np.float32)}, ["Y"])
    out = b.infer({"X": np.zeros((1, 2), np.float32)}, ["Y"])
    assert out["Y"][0, 0] == 1


def test_add_sub_example_runs(tmp_path: Path) -> None:
    build_python_repository(tmp_path, ["add_sub_python"])
    config = _config((tmp_path / "add_sub_python" / "config.pbtxt").read_text())
    runtime = PythonRuntime(config, tmp_path / "add_sub_python" / "1" / "model.py", CPU)
    a = np.array([1, 2, 3, 4], np.float32)
    b = np.array([4, 3, 2, 1], np.float32)
    out = runtime.infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"])
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    runtime.unload()


def test_dtypes_example_round_trips_every_datatype_exactly(tmp_path: Path) -> None:
    assert DTYPES_DATATYPES == ALL_DATATYPES
    build_python_repository(tmp_path, ["dtypes_python"])
    config = _config((tmp_path / "dtypes_python" / "config.pbtxt").read_text())
    runtime = PythonRuntime(config, tmp_path / "dtypes_python" / "1" / "model.py", CPU)
    sent = {d: kit_form(d, edge_values(d)) for d in DTYPES_DATATYPES}
    out = runtime.infer({f"IN_{d}": a for d, a in sent.items()}, ["OUT_BF16", "OUT_BYTES"])
    assert sorted(out) == ["OUT_BF16", "OUT_BYTES"]
    out = runtime.infer(
        {f"IN_{d}": a for d, a in sent.items()}, [f"OUT_{d}" for d in DTYPES_DATATYPES]
    )
    for datatype, data in sent.items():
        assert_identical(out[f"OUT_{datatype}"], data, datatype)
    runtime.unload()
