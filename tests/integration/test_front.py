"""The control plane's front against two real ONNX services, through stock tritonclient.

Service A serves ``simple`` and ``mlp`` (explicit control mode; ``simple_identity`` sits in its
repository, never loaded); service B serves ``simple_string``. The MeshState is built by hand
from their ports. The front (gRPC servicer and HTTP app) runs on its own loop in a thread, on
127.0.0.1 port 0; clients talk to it only, except to check on a service what it did there.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from aiohttp import web
from tritonclient.utils import InferenceServerException

from control_plane.front import add_front_to_server
from control_plane.front_core import Front
from control_plane.front_http import build_front_app
from control_plane.model import READY, MeshState, ModelVersion, ServiceInstance
from control_plane.stats_merge import merge_statistics
from protos.gen.inference import grpc_service_pb2 as pb
from tests.support import ServerThread, settings_for

MAX_MESSAGE = 2**31 - 1


class FrontThread:
    """The front (gRPC + HTTP on port 0) on its own event loop, over a fixed MeshState."""

    def __init__(self, state: MeshState) -> None:
        self.state = state
        self.grpc_port = 0
        self.http_port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> FrontThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("front did not start")
        if self._error is not None:
            raise self._error
        return self

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        front = Front(lambda: self.state)
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ]
        )
        add_front_to_server(front, server)
        runner = web.AppRunner(build_front_app(front.state, front=front))
        try:
            self.grpc_port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.http_port = runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
        self._ready.set()
        try:
            if self._error is None:
                await self._stop.wait()
        finally:
            await runner.cleanup()
            await server.stop(1)
            await front.close()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@dataclass
class Mesh:
    a: ServerThread
    b: ServerThread
    front: FrontThread

    @property
    def grpc(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(f"127.0.0.1:{self.front.grpc_port}")

    @property
    def http(self) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(f"127.0.0.1:{self.front.http_port}")

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.front.http_port}"


def _instance(name: str, srv: ServerThread, models: tuple[str, ...]) -> ServiceInstance:
    assert srv.running is not None
    return ServiceInstance(
        id=name,
        family="onnx",
        host="127.0.0.1",
        grpc_port=srv.running.grpc_port,
        http_port=srv.running.http_port,
        models=tuple(ModelVersion(m, "1", READY) for m in models),
    )


def _repo(example_repo: Path, root: Path, names: tuple[str, ...]) -> Path:
    for n in names:
        shutil.copytree(example_repo / n, root / n)
    return root


@pytest.fixture(scope="module")
def mesh(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    from services.onnx.runtime import OnnxRuntime

    repo_a = _repo(example_repo, tmp_path_factory.mktemp("a"), ("simple", "mlp", "simple_identity"))
    repo_b = _repo(example_repo, tmp_path_factory.mktemp("b"), ("simple_string",))
    explicit = settings_for(repo_a, model_control_mode="explicit", startup_models=("simple", "mlp"))
    started: list[ServerThread | FrontThread] = []
    try:
        a = ServerThread(explicit, [OnnxRuntime]).start()
        started.append(a)
        b = ServerThread(settings_for(repo_b), [OnnxRuntime]).start()
        started.append(b)
        state = MeshState(
            instances=(
                _instance("onnx-a", a, ("simple", "mlp")),
                _instance("onnx-b", b, ("simple_string",)),
            )
        )
        front = FrontThread(state).start()
        started.append(front)
        yield Mesh(a, b, front)
    finally:
        for thing in reversed(started):
            thing.stop()


def simple_inputs(client: type, a: int, b: int) -> list[object]:
    out = []
    for n, v in (("INPUT0", a), ("INPUT1", b)):
        i = client.InferInput(n, [1, 16], "INT32")  # type: ignore[attr-defined]
        i.set_data_from_numpy(np.full((1, 16), v, np.int32))
        out.append(i)
    return out


def test_server_level_answers(mesh: Mesh) -> None:
    for c in (mesh.grpc, mesh.http):
        assert c.is_server_live()
        assert c.is_server_ready()
    meta = mesh.grpc.get_server_metadata(as_json=True)
    assert meta["name"] == "meshserve"
    assert "statistics" in meta["extensions"] and "model_repository" in meta["extensions"]
    assert mesh.http.get_server_metadata() == meta


def test_ready_needs_an_instance_and_nothing_loading() -> None:
    assert not Front(lambda: MeshState()).ready()
    loading = ServiceInstance(
        "x", "onnx", "127.0.0.1", 1, 2, models=(ModelVersion("m", "1", "LOADING"),)
    )
    assert not Front(lambda: MeshState(instances=(loading,))).ready()
    ready = ServiceInstance("x", "onnx", "127.0.0.1", 1, 2, models=(ModelVersion("m", "1", READY),))
    assert Front(lambda: MeshState(instances=(ready,))).ready()


def test_repository_index_spans_services(mesh: Mesh) -> None:
    wanted = {"simple", "mlp", "simple_identity", "simple_string"}
    grpc_index = mesh.grpc.get_model_repository_index(as_json=True)["models"]
    assert wanted <= {m["name"] for m in grpc_index}
    assert {m["name"] for m in grpc_index if m.get("state") == "READY"} == wanted - {
        "simple_identity"
    }
    http_index = mesh.http.get_model_repository_index()
    assert wanted <= {m["name"] for m in http_index}
    request = urllib.request.Request(
        f"{mesh.http_base}/v2/repository/index", data=b'{"ready": true}', method="POST"
    )
    with urllib.request.urlopen(request) as answer:
        ready_only = {m["name"] for m in json.loads(answer.read())}
    assert ready_only == wanted - {"simple_identity"}


async def test_a_silent_service_is_skipped(mesh: Mesh) -> None:
    dead = ServiceInstance("dead", "onnx", "127.0.0.1", 9, 9)
    state = MeshState(instances=(*mesh.front.state.instances, dead))
    front = Front(lambda: state, fanout_timeout=2)
    try:
        names = {m.name for m in (await front.repository_index(False)).models}
        assert {"simple", "simple_string"} <= names
    finally:
        await front.close()


def test_load_unload_forwarded_over_grpc(mesh: Mesh) -> None:
    c, direct_a = mesh.grpc, grpcclient.InferenceServerClient(mesh.a.grpc_url)
    assert not direct_a.is_model_ready("simple_identity")
    c.load_model("simple_identity")  # in A's repository, never loaded: A's index still lists it
    assert direct_a.is_model_ready("simple_identity")
    c.unload_model("simple_identity")
    assert not direct_a.is_model_ready("simple_identity")
    with pytest.raises(InferenceServerException) as info:
        c.load_model("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "'no_such_model'" in info.value.message()


def test_load_unload_forwarded_over_http(mesh: Mesh) -> None:
    c, direct_a = mesh.http, httpclient.InferenceServerClient(mesh.a.http_url)
    c.load_model("simple_identity")
    assert direct_a.is_model_ready("simple_identity")
    c.unload_model("simple_identity")
    assert not direct_a.is_model_ready("simple_identity")
    with pytest.raises(InferenceServerException) as info:
        c.unload_model("no_such_model")
    assert info.value.status() == "404"
    assert "unknown model 'no_such_model'" in info.value.message()


@pytest.mark.parametrize(
    ("model", "version", "expected"),
    [
        ("nope", "", "unknown model 'nope'"),
        ("simple", "7", "unknown version 7 of model 'simple' (it has 1)"),
    ],
)
def test_unknown_model_or_version(mesh: Mesh, model: str, version: str, expected: str) -> None:
    for client, kind in ((mesh.grpc, grpcclient), (mesh.http, httpclient)):
        assert not client.is_model_ready(model, version)
        for call in (
            partial(client.infer, model, simple_inputs(kind, 1, 1), model_version=version),
            partial(client.get_model_metadata, model, version),
            partial(client.get_inference_statistics, model, version),
        ):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert expected in info.value.message()
            assert info.value.status() in ("StatusCode.NOT_FOUND", "404")
    url = f"{mesh.http_base}/v2/models/{model}" + (f"/versions/{version}" if version else "")
    with pytest.raises(urllib.error.HTTPError) as http_info:
        urllib.request.urlopen(url + "/config")
    assert http_info.value.code == 404
    assert json.loads(http_info.value.read()) == {"error": expected}


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_grpc_infer_is_proxied(mesh: Mesh, algorithm: str) -> None:
    c = mesh.grpc
    result = c.infer("simple", simple_inputs(grpcclient, 5, 3), compression_algorithm=algorithm)
    assert (result.as_numpy("OUTPUT0") == 8).all() and (result.as_numpy("OUTPUT1") == 2).all()
    assert c.is_model_ready("simple_string")
    assert c.get_model_metadata("mlp", as_json=True)["name"] == "mlp"
    assert c.get_model_config("simple", as_json=True)["config"]["max_batch_size"] == 8
    strings = []
    for n, v in (("INPUT0", b"7"), ("INPUT1", b"2")):
        i = grpcclient.InferInput(n, [1, 16], "BYTES")
        i.set_data_from_numpy(np.full((1, 16), v, np.object_))
        strings.append(i)
    assert c.infer("simple_string", strings).as_numpy("OUTPUT0")[0, 0] == b"9"


def test_stream_is_proxied(mesh: Mesh) -> None:
    c, results = mesh.grpc, []
    c.start_stream(callback=lambda result, error: results.append((result, error)))
    try:
        for k in range(3):
            c.async_stream_infer("simple", simple_inputs(grpcclient, k, 1), request_id=str(k))
    finally:
        c.stop_stream()
    assert len(results) == 3 and all(e is None for _, e in results)
    by_id = {r.get_response().id: r for r, _ in results}
    assert (by_id["2"].as_numpy("OUTPUT0") == 3).all()


def test_http_infer_is_proxied_with_compression(mesh: Mesh) -> None:
    c = mesh.http
    result = c.infer(
        "simple",
        simple_inputs(httpclient, 4, 1),
        request_compression_algorithm="gzip",
        response_compression_algorithm="gzip",
    )
    assert (result.as_numpy("OUTPUT0") == 5).all() and (result.as_numpy("OUTPUT1") == 3).all()
    plain = c.infer("simple", simple_inputs(httpclient, 2, 2), model_version="1")
    assert (plain.as_numpy("OUTPUT0") == 4).all()
    assert c.get_model_config("simple_string")["name"] == "simple_string"
    # the service's compressed answer passes through with its encoding and binary-header length
    body = {
        "inputs": [
            {"name": n, "shape": [1, 16], "datatype": "INT32", "data": [1] * 16}
            for n in ("INPUT0", "INPUT1")
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }
    raw = urllib.request.Request(
        f"{mesh.http_base}/v2/models/simple/infer",
        data=json.dumps(body).encode(),
        headers={"Accept-Encoding": "gzip", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(raw) as answer:
        assert answer.headers["Content-Encoding"] == "gzip"
        assert int(answer.headers["Inference-Header-Content-Length"]) > 0
        assert gzip.decompress(answer.read())


def test_statistics_are_merged(mesh: Mesh) -> None:
    mesh.grpc.infer("simple", simple_inputs(grpcclient, 1, 1))
    mesh.grpc.infer("simple_string", [_strings("1")[0], _strings("1")[1]])
    merged = {s["name"]: s for s in mesh.grpc.get_inference_statistics(as_json=True)["model_stats"]}
    assert {"simple", "mlp", "simple_string"} <= set(merged)
    direct = grpcclient.InferenceServerClient(mesh.b.grpc_url).get_inference_statistics(
        "simple_string", as_json=True
    )["model_stats"][0]
    assert (
        merged["simple_string"]["inference_stats"]["success"]["count"]
        == (direct["inference_stats"]["success"]["count"])
    )
    over_http = {s["name"] for s in mesh.http.get_inference_statistics()["model_stats"]}
    assert {"simple", "mlp", "simple_string"} <= over_http
    assert mesh.http.get_inference_statistics("simple")["model_stats"][0]["name"] == "simple"


def _strings(value: str) -> list[grpcclient.InferInput]:
    out = []
    for n in ("INPUT0", "INPUT1"):
        i = grpcclient.InferInput(n, [1, 16], "BYTES")
        i.set_data_from_numpy(np.full((1, 16), value.encode(), np.object_))
        out.append(i)
    return out


def test_replica_statistics_are_summed() -> None:
    one = pb.ModelStatistics(name="m", version="1", inference_count=2, last_inference=5)
    one.inference_stats.success.count = 2
    one.batch_stats.add(batch_size=1).compute_infer.count = 2
    two = pb.ModelStatistics(name="m", version="1", inference_count=3, last_inference=9)
    two.inference_stats.success.count = 3
    two.batch_stats.add(batch_size=1).compute_infer.count = 3
    merged = merge_statistics(
        [
            pb.ModelStatisticsResponse(model_stats=[one]),
            pb.ModelStatisticsResponse(model_stats=[two]),
        ]
    ).model_stats
    assert len(merged) == 1
    assert merged[0].inference_count == 5 and merged[0].last_inference == 9
    assert merged[0].inference_stats.success.count == 5
    assert merged[0].batch_stats[0].compute_infer.count == 5


def test_shared_memory_registration_fans_out(mesh: Mesh) -> None:
    handle = shm.create_shared_memory_region("front_region", "/meshserve_front_test", 128)
    direct = [
        grpcclient.InferenceServerClient(mesh.a.grpc_url),
        grpcclient.InferenceServerClient(mesh.b.grpc_url),
    ]
    try:
        mesh.grpc.register_system_shared_memory("front_region", "/meshserve_front_test", 128)
        for c in direct:
            assert "front_region" in c.get_system_shared_memory_status(as_json=True)["regions"]
        assert "front_region" in mesh.grpc.get_system_shared_memory_status(as_json=True)["regions"]
        mesh.grpc.unregister_system_shared_memory("front_region")
        for c in direct:
            assert c.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}

        mesh.http.register_system_shared_memory("http_region", "/meshserve_front_test", 64)
        for c in direct:
            assert "http_region" in c.get_system_shared_memory_status(as_json=True)["regions"]
        assert [r["name"] for r in mesh.http.get_system_shared_memory_status()] == ["http_region"]
        mesh.http.unregister_system_shared_memory()
        for c in direct:
            assert c.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    finally:
        for c in direct:
            c.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
