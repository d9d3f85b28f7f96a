"""The Python backend: the pb_utils module and PythonRuntime driving a user's model.py directly."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import text_format

from examples.build_python import DTYPES_DATATYPES, build_python_repository
from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pb_grpc
from protos.gen.inference import model_config_pb2 as mc
from services.core import gateway_client
from services.core.errors import InternalError, InvalidArgument, ModelLoadError, ServingError
from services.core.requests import InferRequest, RequestedOutput
from services.core.runtime import InstanceSpec
from services.python import triton_python_backend_utils as pb_utils
from services.python.runtime import PythonRuntime
from tests.datatype_samples import ALL_DATATYPES, assert_identical, edge_values, kit_form
from tests.fake_gateway import serving_as_gateway

CPU = InstanceSpec(name="m_0", kind=mc.ModelInstanceGroup.KIND_CPU)

# A model that records what it saw (in a JSON file next to it) and answers per request.
RECORDING_MODEL = """
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).parent


class TritonPythonModel:
    def initialize(self, args):
        (HERE / "args.json").write_text(json.dumps(args))
        self.calls = []

    def execute(self, requests):
        self.calls.append(len(requests))
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            params = json.loads(request.parameters())
            if params.get("fail"):
                error = pb_utils.TritonError("bad value", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            out = pb_utils.Tensor("Y", (x * 2).astype(np.float32))
            text = pb_utils.Tensor("T", np.array([[request.request_id()]] * len(x), dtype=object))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out, text]))
        return responses

    def finalize(self):
        (HERE / "finalized").write_text(str(self.calls))
"""

RECORDING_CONFIG = """
name: "rec"
backend: "python"
max_batch_size: 4
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [
  { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] },
  { name: "T" data_type: TYPE_STRING dims: [ 1 ] }
]
"""


def _write(root: Path, model_py: str) -> Path:
    path = root / "rec" / "1" / "model.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(model_py))
    return path


def _config(text: str = RECORDING_CONFIG) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _request(x: list[list[float]], rid: str = "", **params: bool) -> InferRequest:
    return InferRequest(
        "rec", "", {"X": np.array(x, dtype=np.float32)}, id=rid, parameters=dict(params)
    )


# --- pb_utils -------------------------------------------------------------------------------


def test_tensor_wraps_numpy_without_copy() -> None:
    array = np.arange(4, dtype=np.float32)
    tensor = pb_utils.Tensor("X", array)
    assert tensor.name() == "X"
    assert tensor.as_numpy() is array
    assert tensor.is_cpu()
    back = pb_utils.Tensor.from_dlpack("Y", tensor.to_dlpack())
    np.testing.assert_array_equal(back.as_numpy(), array)
    with pytest.raises(pb_utils.TritonModelException, match="numpy array"):
        pb_utils.Tensor("X", [1, 2])  # type: ignore[arg-type]


def test_request_response_accessors() -> None:
    x = pb_utils.Tensor("X", np.zeros(2, dtype=np.float32))
    request = pb_utils.InferenceRequest(
        model_name="m",
        inputs=[x],
        requested_output_names=["Y"],
        request_id="7",
        parameters={"a": 1},
    )
    assert request.inputs() == [x]
    assert request.requested_output_names() == ["Y"]
    assert request.request_id() == "7"
    assert json.loads(request.parameters()) == {"a": 1}
    assert pb_utils.get_input_tensor_by_name(request, "X") is x
    assert pb_utils.get_input_tensor_by_name(request, "nope") is None
    response = pb_utils.InferenceResponse(output_tensors=[x])
    assert not response.has_error()
    assert pb_utils.get_output_tensor_by_name(response, "X") is x
    failed = pb_utils.InferenceResponse(error=pb_utils.TritonError("no"))
    assert failed.has_error()
    error = failed.error()
    assert error is not None and error.message() == "no"
    assert error.code() == pb_utils.TritonError.INTERNAL
    assert request.model_version() == -1 and request.timeout() == 0


def test_config_and_type_helpers() -> None:
    config = {"input": [{"name": "A", "data_type": "TYPE_INT8"}], "output": [{"name": "B"}]}
    assert pb_utils.get_input_config_by_name(config, "A") == config["input"][0]
    assert pb_utils.get_output_config_by_name(config, "B") == {"name": "B"}
    assert pb_utils.get_output_config_by_name(config, "A") is None
    assert pb_utils.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb_utils.triton_string_to_numpy("TYPE_NOPE") is None
    assert pb_utils.numpy_to_triton_type(np.float32) == pb_utils.TYPE_FP32 == mc.TYPE_FP32
    assert pb_utils.numpy_to_triton_type(np.object_) == mc.TYPE_STRING
    assert pb_utils.triton_to_numpy_type(mc.TYPE_INT64) is np.int64
    assert not pb_utils.using_decoupled_model_transaction_policy(config)


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


class FakeGateway(pb_grpc.GRPCInferenceServiceServicer):
    """BLS tests' stand-in for the gateway: ``simple`` adds/subtracts INT32, ``echo`` echoes."""

    def __init__(self) -> None:
        self.requests: list[pb.ModelInferRequest] = []

    def ModelInfer(  # noqa: N802 (the generated servicer's method name)
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        self.requests.append(request)
        reply = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        if request.model_name == "echo":
            for t in request.inputs:
                reply.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            reply.raw_output_contents.extend(request.raw_input_contents)
            return reply
        if request.model_name != "simple":
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model: '{request.model_name}'")
        a, b = (np.frombuffer(raw, np.int32) for raw in request.raw_input_contents)
        results = {"OUTPUT0": a + b, "OUTPUT1": a - b}
        for name in [o.name for o in request.outputs] or list(results):
            reply.outputs.add(name=name, datatype="INT32", shape=request.inputs[0].shape)
            reply.raw_output_contents.append(results[name].tobytes())
        return reply


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGateway]:
    fake = FakeGateway()
    with serving_as_gateway(fake, monkeypatch):
        yield fake


def _simple_request(model: str = "simple", **kwargs: Any) -> pb_utils.InferenceRequest:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    tensors = [pb_utils.Tensor("INPUT0", a), pb_utils.Tensor("INPUT1", np.ones_like(a))]
    return pb_utils.InferenceRequest(model, tensors, ["OUTPUT0"], **kwargs)


def test_bls_exec_calls_the_gateway(gateway: FakeGateway) -> None:
    response = _simple_request(model_version=2, parameters={"k": 1, "flag": True}).exec()
    out = pb_utils.get_output_tensor_by_name(response, "OUTPUT0")
    assert out is not None
    np.testing.assert_array_equal(out.as_numpy(), np.arange(1, 17, dtype=np.int32)[None])
    (sent,) = gateway.requests
    assert (sent.model_name, sent.model_version) == ("simple", "2")
    assert [o.name for o in sent.outputs] == ["OUTPUT0"]
    assert sent.parameters["k"].int64_param == 1 and sent.parameters["flag"].bool_param


NUMERIC = ["?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"]


@pytest.mark.parametrize(
    "array",
    [np.arange(6).astype(t).reshape(2, 3) for t in NUMERIC]
    + [np.array([b"a", b"", "\u00e9".encode()], dtype=object)],
)
def test_bls_datatypes_travel_raw(gateway: FakeGateway, array: np.ndarray) -> None:
    request = pb_utils.InferenceRequest("echo", [pb_utils.Tensor("X", array)], ["X"])
    out = pb_utils.get_output_tensor_by_name(request.exec(), "X")
    assert out is not None and out.as_numpy().dtype == array.dtype
    np.testing.assert_array_equal(out.as_numpy(), array)
    assert not gateway.requests[0].inputs[0].HasField("contents")


def test_bls_errors_returned(gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    response = _simple_request("nope").exec()
    error = response.error()
    assert response.has_error() and error is not None
    assert error.code() == pb_utils.TritonError.NOT_FOUND
    assert "unknown model: 'nope'" in error.message()
    bad = pb_utils.InferenceRequest("echo", [pb_utils.Tensor("X", np.zeros(2, "c8"))], ["X"])
    assert "complex64" in str(bad.exec().error())
    monkeypatch.setenv(gateway_client.GATEWAY_ENV, "127.0.0.1:1")
    down = _simple_request(timeout=2_000_000).exec().error()
    assert down is not None and down.code() == pb_utils.TritonError.UNAVAILABLE


def test_bls_async_exec(gateway: FakeGateway) -> None:
    async def both() -> list[pb_utils.InferenceResponse]:
        requests = [_simple_request(), _simple_request("x")]
        return list(await asyncio.gather(*(r.async_exec() for r in requests)))

    ok, failed = asyncio.run(both())
    assert not ok.has_error() and failed.has_error()
    assert len(gateway.requests) == 2


def test_async_execute_awaits_bls(gateway: FakeGateway, tmp_path: Path) -> None:
    model = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        async def execute(self, requests):
            x = pb_utils.get_input_tensor_by_name(requests[0], "X")
            reply = await pb_utils.InferenceRequest("echo", [x], ["X"]).async_exec()
            y = pb_utils.get_output_tensor_by_name(reply, "X").as_numpy() * 2
            return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", y)])]
    """
    runtime = PythonRuntime(_config(), _write(tmp_path, model), CPU)
    out = runtime.infer({"X": np.ones((1, 2), np.float32)}, ["Y"])
    np.testing.assert_array_equal(out["Y"], np.full((1, 2), 2, np.float32))
    assert gateway.requests[0].model_name == "echo"
