"""Bad input gets a clear error with the right status, and the server keeps serving.

Each case checks the status code and message, then that a good request still succeeds.
Malformed messages that tritonclient refuses to build are sent through raw grpcio stubs.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from tests.support import ServerThread, settings_for

SLOW_QUEUE = """
name: "slow"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
dynamic_batching {
  max_queue_delay_microseconds: 1500000
  default_queue_policy { max_queue_size: 1 }
}
"""

TIMEOUT_QUEUE = """
name: "timeout"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] }, { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] } ]
dynamic_batching {
  max_queue_delay_microseconds: 300000
  default_queue_policy { default_timeout_microseconds: 5000000 timeout_action: REJECT allow_timeout_override: true }
}
"""


@pytest.fixture(scope="module")
def server(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory, grpc_frontend: str
) -> Iterator[ServerThread]:
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("error_models")
    shutil.copytree(example_repo / "simple", root / "simple")
    for name, text in (("slow", SLOW_QUEUE), ("timeout", TIMEOUT_QUEUE)):
        shutil.copytree(example_repo / "simple", root / name)
        (root / name / "config.pbtxt").write_text(text)
    shutil.copytree(example_repo / "simple", root / "broken_config")
    (root / "broken_config" / "config.pbtxt").write_text(
        'name: "broken_config"\nmax_batch_size: 8\ninput [ { name: "X" \n'
    )
    shutil.copytree(example_repo / "simple", root / "broken_model")
    (root / "broken_model" / "config.pbtxt").write_text(
        (example_repo / "simple" / "config.pbtxt").read_text().replace('"simple"', '"broken_model"')
    )
    (root / "broken_model" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    with ServerThread(settings_for(root, grpc_frontend=grpc_frontend), [OnnxRuntime]) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pbg.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.grpc_url)
    try:
        yield pbg.GRPCInferenceServiceStub(channel)
    finally:
        channel.close()


def make_inputs(
    shape: list[int], dtype: str = "INT32", names: tuple[str, ...] = ("INPUT0", "INPUT1")
) -> list[grpcclient.InferInput]:
    np_dtype = {"INT32": np.int32, "FP32": np.float32, "INT64": np.int64}[dtype]
    out = []
    for n in names:
        i = grpcclient.InferInput(n, shape, dtype)
        i.set_data_from_numpy(np.ones(shape, dtype=np_dtype))
        out.append(i)
    return out


def assert_still_serving(client: grpcclient.InferenceServerClient, model: str = "simple") -> None:
    result = client.infer(model, make_inputs([1, 16]))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2, np.int32))


def expect_error(
    client: grpcclient.InferenceServerClient,
    status: str,
    words: list[str],
    model: str,
    inputs: list[grpcclient.InferInput],
    **kw: object,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, **kw)  # type: ignore[arg-type]
    assert info.value.status() == status, info.value
    for w in words:
        assert w in info.value.message(), info.value.message()
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("model", "kwargs", "inputs", "status", "words"),
    [
        (
            "no_such_model",
            {},
            lambda: make_inputs([1, 16]),
            "StatusCode.NOT_FOUND",
            ["no_such_model"],
        ),
        (
            # echoed in full, the name would make trailers no client accepts (over 8 KiB)
            "n" * 100_000,
            {},
            lambda: make_inputs([1, 16]),
            "StatusCode.NOT_FOUND",
            ["unknown model 'nnnn", "(message cut: 100016 characters)"],
        ),
        (
            "simple",
            {"model_version": "9"},
            lambda: make_inputs([1, 16]),
            "StatusCode.NOT_FOUND",
            ["version 9", "simple"],
        ),
        (
            "simple",
            {},
            lambda: make_inputs([1, 16], names=("INPUT0", "WRONG")),
            "StatusCode.INVALID_ARGUMENT",
            ["WRONG"],
        ),
        (
            "simple",
            {},
            lambda: make_inputs([1, 16], names=("INPUT0",)),
            "StatusCode.INVALID_ARGUMENT",
            ["INPUT1"],
        ),
        (
            "simple",
            {},
            lambda: make_inputs([1, 16], names=("INPUT0", "INPUT1", "INPUT2")),
            "StatusCode.INVALID_ARGUMENT",
            ["INPUT2"],
        ),
        (
            "simple",
            {},
            lambda: make_inputs([1, 16], dtype="FP32"),
            "StatusCode.INVALID_ARGUMENT",
            ["FP32", "INT32"],
        ),
        (
            "simple",
            {},
            lambda: make_inputs([1, 15]),
            "StatusCode.INVALID_ARGUMENT",
            ["INPUT0", "15"],
        ),
        (
            "simple",
            {},
            lambda: make_inputs([9, 16]),
            "StatusCode.INVALID_ARGUMENT",
            ["9", "max_batch_size", "8"],
        ),
    ],
)
def test_bad_request(
    client: grpcclient.InferenceServerClient,
    model: str,
    kwargs: dict[str, object],
    inputs: object,
    status: str,
    words: list[str],
) -> None:
    expect_error(client, status, words, model, inputs(), **kwargs)  # type: ignore[operator]


def raw_request(**fields: object) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
    for key, value in fields.items():
        setattr(req, key, value) if not isinstance(value, list) else getattr(req, key).extend(value)
    return req


def expect_raw_error(
    stub: pbg.GRPCInferenceServiceStub,
    req: pb.ModelInferRequest,
    code: grpc.StatusCode,
    words: list[str],
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req)
    assert info.value.code() == code, info.value
    for w in words:
        assert w in (info.value.details() or ""), info.value.details()


def test_raw_byte_size_mismatch(
    stub: pbg.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    good = np.ones(16, np.int32).tobytes()
    expect_raw_error(
        stub,
        raw_request(raw_input_contents=[good, good[:-4]]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["INPUT1", "60"],
    )
    assert_still_serving(client)


def test_both_contents_and_raw(
    stub: pbg.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    req = raw_request(raw_input_contents=[np.ones(16, np.int32).tobytes()] * 2)
    req.inputs[0].contents.int_contents.extend([1] * 16)
    expect_raw_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, ["raw"])
    assert_still_serving(client)


def test_malformed_bytes_lengths(
    stub: pbg.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient
) -> None:
    req = pb.ModelInferRequest(model_name="simple_identity_missing")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
    req.raw_input_contents.append(b"\x05\x00\x00\x00abc")  # claims 5 bytes, has 3
    req.model_name = "simple"
    expect_raw_error(stub, req, grpc.StatusCode.INVALID_ARGUMENT, ["INPUT0"])
    assert_still_serving(client)


def test_config_that_does_not_parse_and_invalid_model_file(
    client: grpcclient.InferenceServerClient,
) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    broken = index["broken_config"]
    assert broken["state"] == "UNAVAILABLE"
    assert ("config.pbtxt:" in broken["reason"] and ":3" in broken["reason"]) or "line 3" in broken[
        "reason"
    ]
    bad_model = index["broken_model"]
    assert bad_model["state"] == "UNAVAILABLE"
    assert "model.onnx" in bad_model["reason"]
    for name in ("broken_config", "broken_model"):
        assert not client.is_model_ready(name)
        with pytest.raises(InferenceServerException) as info:
            client.infer(name, make_inputs([1, 16]))
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert name in info.value.message()
    assert_still_serving(client)


def test_full_queue_is_resource_exhausted(
    client: grpcclient.InferenceServerClient, server: ServerThread
) -> None:
    first: list[object] = []
    waiting = threading.Thread(
        target=lambda: first.append(client.infer("slow", make_inputs([1, 16])))
    )
    waiting.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until the first request sits in the queue
            stats = client.get_inference_statistics("slow", as_json=True)["model_stats"][0]
            if server.running and server.running.manager.get("slow", "").batcher.pending == 1:
                break
            time.sleep(0.01)
        c2 = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException) as info:
            c2.infer("slow", make_inputs([1, 16]))
        c2.close()
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue" in info.value.message() and "slow" in info.value.message()
        del stats
    finally:
        waiting.join(30)
    assert len(first) == 1  # the queued request still completed
    assert_still_serving(client)


def test_queue_timeout(client: grpcclient.InferenceServerClient) -> None:
    # allow_timeout_override: a request may shorten the 5 s default; 1 ms expires in the 0.3 s queue
    with pytest.raises(InferenceServerException) as info:
        client.infer("timeout", make_inputs([1, 16]), timeout=1000)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "timeout" in info.value.message() and "'timeout'" in info.value.message()
    result = client.infer("timeout", make_inputs([1, 16]))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 16), 2, np.int32))
    assert_still_serving(client)


def test_oversized_message(example_repo: Path, tmp_path: Path) -> None:
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path / "models"
    shutil.copytree(example_repo / "simple", root / "simple")
    with ServerThread(settings_for(root, max_message_bytes=64 * 1024), [OnnxRuntime]) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        big = grpcclient.InferInput("INPUT0", [8, 16], "INT32")
        big.set_data_from_numpy(np.ones((8, 16), np.int32))
        pad = grpcclient.InferInput("INPUT1", [8, 16], "INT32")
        pad.set_data_from_numpy(np.ones((8, 16), np.int32))
        req_params = {"padding": "x" * (100 * 1024)}
        with pytest.raises(InferenceServerException) as info:
            c.infer("simple", [big, pad], parameters=req_params)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert_still_serving(c)
        c.close()
