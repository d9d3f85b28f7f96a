"""The generated protocol code: importable, wire-compatible with tritonclient, reproducible."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2 as stock_health_pb2
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_pb

from protos import build
from protos.gen.health import health_pb2, health_pb2_grpc
from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc, model_config_pb2

GEN_DIR = Path(build.__file__).resolve().parent / "gen"
ROOT = GEN_DIR.parents[1]


def _file_proto(fd: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(proto)
    return proto


def _full_triton_request() -> triton_pb.ModelInferRequest:
    req = triton_pb.ModelInferRequest(model_name="simple", model_version="3", id="req-1")
    req.parameters["priority"].uint64_param = 2
    req.parameters["timeout"].int64_param = -5
    req.parameters["flag"].bool_param = True
    req.parameters["s"].string_param = "x"
    req.parameters["d"].double_param = 0.5
    tensor = req.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    tensor.parameters["shared_memory_region"].string_param = "r0"
    contents = tensor.contents
    contents.bool_contents.append(True)
    contents.int_contents.extend([1, -2])
    contents.int64_contents.append(-(2**40))
    contents.uint_contents.append(2**31)
    contents.uint64_contents.append(2**63)
    contents.fp32_contents.append(1.5)
    contents.fp64_contents.append(-2.25)
    contents.bytes_contents.append(b"\x00\xff")
    out = req.outputs.add(name="OUTPUT0")
    out.parameters["binary_data"].bool_param = True
    out.parameters["classification"].int64_param = 3
    req.raw_input_contents.append(b"\x01\x02\x03\x04")
    return req


def test_generated_modules_import_and_expose_services() -> None:
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceServicer")
    assert hasattr(grpc_service_pb2_grpc, "add_GRPCInferenceServiceServicer_to_server")
    assert hasattr(health_pb2_grpc, "HealthServicer")
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert len(methods) == 20
    stream = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[
        "ModelStreamInfer"
    ]
    assert stream.client_streaming and stream.server_streaming


def test_descriptors_identical_to_tritonclient() -> None:
    assert _file_proto(pb.DESCRIPTOR) == _file_proto(triton_pb.DESCRIPTOR)
    assert _file_proto(model_config_pb2.DESCRIPTOR) == _file_proto(triton_mc.DESCRIPTOR)


def test_health_descriptor_identical_to_grpc_health() -> None:
    assert _file_proto(health_pb2.DESCRIPTOR) == _file_proto(stock_health_pb2.DESCRIPTOR)


def test_tritonclient_request_round_trips_through_ours() -> None:
    original = _full_triton_request()
    wire = original.SerializeToString(deterministic=True)
    ours = pb.ModelInferRequest.FromString(wire)
    assert ours.model_name == "simple" and ours.model_version == "3" and ours.id == "req-1"
    assert ours.parameters["priority"].uint64_param == 2
    assert ours.parameters["d"].WhichOneof("parameter_choice") == "double_param"
    assert list(ours.inputs[0].shape) == [1, 16]
    assert list(ours.inputs[0].contents.uint64_contents) == [2**63]
    assert list(ours.inputs[0].contents.bytes_contents) == [b"\x00\xff"]
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    assert list(ours.raw_input_contents) == [b"\x01\x02\x03\x04"]
    assert ours.SerializeToString(deterministic=True) == wire


def test_our_stream_response_parses_in_tritonclient() -> None:
    resp = pb.ModelStreamInferResponse(error_message="boom")
    resp.infer_response.model_name = "m"
    resp.infer_response.outputs.add(name="OUT", datatype="FP32", shape=[2])
    resp.infer_response.raw_output_contents.append(b"\x00" * 8)
    parsed = triton_pb.ModelStreamInferResponse.FromString(resp.SerializeToString())
    assert parsed.error_message == "boom"
    assert parsed.infer_response.outputs[0].name == "OUT"
    assert parsed.infer_response.raw_output_contents[0] == b"\x00" * 8


def test_model_config_response_round_trips() -> None:
    cfg = model_config_pb2.ModelConfig(name="m", max_batch_size=8, runtime="x")
    cfg.dynamic_batching.priority_queue_policy[2].max_queue_size = 4
    cfg.input.add(name="IN", data_type=model_config_pb2.TYPE_BF16, dims=[-1])
    wire = pb.ModelConfigResponse(config=cfg).SerializeToString()
    parsed = triton_pb.ModelConfigResponse.FromString(wire)
    assert parsed.config.dynamic_batching.priority_queue_policy[2].max_queue_size == 4
    assert parsed.config.input[0].data_type == triton_mc.TYPE_BF16


def test_regeneration_reproduces_committed_bytes(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    # protoc runs as its own process, as `make protos` does: in this process TensorFlow and
    # torch (imported by other test modules) bring their own protobuf runtimes, and the
    # in-process compiler crashes next to them.
    subprocess.run(
        [sys.executable, "-m", "protos.build", "--out", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(GEN_DIR): p.read_bytes()
        for p in GEN_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert fresh.keys() == committed.keys()
    stale = sorted(str(k) for k in fresh if fresh[k] != committed[k])
    assert not stale, f"protos/gen is stale, run `make protos`: {stale}"
