"""Shared by the Python backend tests (test_pb_utils.py, test_python_runtime.py) and
tests/integration/test_python_service.py: a recording model.py and its config, writing a model.py
into a repository, and a fake gateway for BLS calls.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import text_format

from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pb_grpc
from protos.gen.inference import model_config_pb2 as mc
from services.core.runtime import InstanceSpec

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
