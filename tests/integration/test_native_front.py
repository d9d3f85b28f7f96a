"""grpc_front, the C++ gRPC front, in front of the real ONNX service (native_front.py).

What the rest of the suite cannot see: the front owns the port, every call and stream is run by
the service's handlers, health streams work, calls the client abandons are cancelled in the
service, a message over the limit is refused by the front, and a front that dies stops the
service's gRPC (``closed``) instead of leaving it deaf.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from protos.gen.health import health_pb2 as hpb
from protos.gen.health import health_pb2_grpc as hgrpc
from services.core.native_front import NativeFront, front_binary
from tests.support import ServerThread, settings_for

pytestmark = pytest.mark.skipif(
    front_binary() is None,
    reason="grpc_front is not built (make native; needs Debian's libgrpc++-dev)",
)


def _start(root: Path, **overrides: object) -> ServerThread:
    from services.onnx.runtime import OnnxRuntime

    return ServerThread(
        settings_for(root, grpc_frontend="native", **overrides), [OnnxRuntime]
    ).start()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples.build_repository import build_repository

    root = tmp_path_factory.mktemp("front_models")
    build_repository(root)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    s = _start(repo)
    try:
        yield s
    finally:
        s.stop()


def _front(server: ServerThread) -> NativeFront:
    assert server.running is not None
    front = server.running.grpc_server
    assert isinstance(front, NativeFront)
    return front


def _inputs(value: int = 1) -> list[grpcclient.InferInput]:
    """INPUT0 and INPUT1 of ``simple``, one row of ``value``."""
    inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(np.full((1, 16), value, np.int32))
    return inputs


def _simple(client: grpcclient.InferenceServerClient, value: int = 1) -> None:
    out = client.infer("simple", _inputs(value)).as_numpy("OUTPUT0")
    assert out is not None and (out == 2 * value).all()


def test_the_front_owns_the_port_and_runs_the_services_handlers(server: ServerThread) -> None:
    front = _front(server)
    assert front.port == server.running.grpc_port  # type: ignore[union-attr]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready()
        _simple(client, 3)
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata("no_such_model")
        assert err.value.status() == "StatusCode.NOT_FOUND"
        assert "no_such_model" in err.value.message()
    # a call leaves the table on the service's loop right after its answer is written, which
    # the client (this thread) may already have read: give the loop a moment
    deadline = time.monotonic() + 2
    while front.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert front.in_flight == 0


def test_health_check_and_watch_stream_through_the_front(server: ServerThread) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = hgrpc.HealthStub(channel)
        assert stub.Check(hpb.HealthCheckRequest()).status == hpb.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(hpb.HealthCheckRequest(service="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(hpb.HealthCheckRequest())
        assert next(watch).status == hpb.HealthCheckResponse.SERVING
        watch.cancel()
    _wait_no_calls(_front(server))


def test_an_unknown_method_is_unimplemented(server: ServerThread) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/NoSuchRpc")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            _simple(client)


def test_a_stream_the_client_abandons_is_cancelled_in_the_service(server: ServerThread) -> None:
    front = _front(server)
    results: queue.Queue[object] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put(error or result))
        for n in range(3):
            client.async_stream_infer("simple", _inputs(), request_id=str(n))
        got = sorted(results.get(timeout=30).get_response().id for _ in range(3))  # type: ignore[attr-defined]
        assert got == ["0", "1", "2"]
        assert front.in_flight == 1  # the open stream
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    _wait_no_calls(front)
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        _simple(c)


def test_a_deadline_reaches_the_service_as_time_remaining(server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.infer("simple", _inputs(), client_timeout=5.0).as_numpy("OUTPUT0") is not None


def test_a_large_message_round_trips(server: ServerThread) -> None:
    text = np.array([[b"x" * (40 << 20)]], dtype=np.object_)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        i = grpcclient.InferInput("INPUT0", [1, 1], "BYTES")
        i.set_data_from_numpy(text)
        out = client.infer("simple_identity", [i]).as_numpy("OUTPUT0")
        assert out is not None and out[0][0] == text[0][0]


def test_a_message_over_the_limit_is_refused_and_the_service_keeps_serving(repo: Path) -> None:
    small = _start(repo, max_message_bytes=64 * 1024)
    try:
        with grpcclient.InferenceServerClient(small.grpc_url) as client:
            i = grpcclient.InferInput("INPUT0", [1, 1], "BYTES")
            i.set_data_from_numpy(np.array([[b"y" * (1 << 20)]], dtype=np.object_))
            with pytest.raises(InferenceServerException) as err:
                client.infer("simple_identity", [i])
            assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            _simple(client)
    finally:
        small.stop()


def test_a_front_that_dies_closes_the_services_grpc(repo: Path) -> None:
    s = _start(repo)
    try:
        front = _front(s)
        assert front._process is not None
        os.kill(front._process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not front.closed.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert front.closed.is_set()
    finally:
        s.stop()


def test_the_native_frontend_asked_for_but_not_built_is_a_clear_error(
    repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MESHSERVE_GRPC_FRONT", str(tmp_path / "missing"))
    with pytest.raises(OSError, match="make native"):
        _start(repo)


def _wait_no_calls(front: NativeFront, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while front.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert front.in_flight == 0
