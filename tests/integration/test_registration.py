"""A real ONNX service registering with a real embedded registry (RegistryServicer, port 0):
READY models are seen, an explicit unload shows up within a second, stopping the service
deregisters it, and a service started while the registry is down registers once it comes up."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import tritonclient.grpc as grpcclient

from control_plane.model import ServiceInstance
from control_plane.registry import Registry, RegistryServicer
from protos.gen.meshserve import registry_pb2_grpc as rgrpc
from tests.support import ServerThread, settings_for

T = TypeVar("T")
Instances = tuple[ServiceInstance, ...]


class RegistryThread:
    """The embedded registry and its gRPC server on their own event loop in a thread."""

    def __init__(self, port: int = 0) -> None:
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.registry: Registry | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> RegistryThread:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self.registry = Registry()
        self.registry.start()
        self._server = grpc.aio.server()
        rgrpc.add_RegistryServicer_to_server(RegistryServicer(self.registry), self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self._port}")
        await self._server.start()

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _stop(self) -> None:
        assert self._server is not None and self.registry is not None
        await self._server.stop(0)
        await self.registry.close()

    def instances(self) -> Instances:
        async def read() -> Instances:
            assert self.registry is not None
            return self.registry.instances()

        return self._call(read())

    def wait_until(self, predicate: Callable[[Instances], bool], timeout: float) -> Instances:
        """Wait (on the registry's change notifications, no polling) until predicate holds."""

        async def until() -> Instances:
            assert self.registry is not None
            reg = self.registry
            async with asyncio.timeout(timeout):
                while True:
                    seen = reg.version
                    if predicate(reg.instances()):
                        return reg.instances()
                    await reg.wait_changed(seen)

        return self._call(until(), timeout + 5)


@pytest.fixture
def registry() -> Iterator[RegistryThread]:
    reg = RegistryThread().start()
    yield reg
    reg.stop()


def _ready(instances: Instances) -> set[tuple[str, str]]:
    return {(m.name, m.version) for i in instances for m in i.ready_versions()}


def test_registers_models_follows_an_unload_and_deregisters_on_stop(
    repo_copy: Path, registry: RegistryThread
) -> None:
    from services.onnx.runtime import OnnxRuntime

    settings = settings_for(
        repo_copy,
        model_control_mode="explicit",
        startup_models=("simple",),
        control_plane=f"127.0.0.1:{registry.port}",
        family="onnx",
    )
    with ServerThread(settings, [OnnxRuntime]) as srv:
        (inst,) = registry.wait_until(lambda i: ("simple", "1") in _ready(i), timeout=5)
        assert srv.running is not None
        assert inst.family == "onnx" and inst.id.startswith("onnx-")
        assert (inst.host, inst.grpc_port) == ("127.0.0.1", srv.running.grpc_port)
        assert inst.http_port == srv.running.http_port
        assert inst.metrics_port == srv.running.metrics_port
        (simple,) = [m for m in inst.models if m.name == "simple"]
        assert simple.platform == "onnxruntime_onnx"
        assert not any(m.name == "mlp" and m.state == "READY" for m in inst.models)

        client = grpcclient.InferenceServerClient(srv.grpc_url)
        client.unload_model("simple")
        (inst,) = registry.wait_until(lambda i: ("simple", "1") not in _ready(i), timeout=1.0)
        client.load_model("mlp")
        registry.wait_until(lambda i: ("mlp", "1") in _ready(i), timeout=1.0)
        client.close()
    # deregistered at once on stop, not after the 3 s lease
    assert registry.instances() == ()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_service_started_while_registry_is_down_registers_when_it_comes_up(
    repo_copy: Path,
) -> None:
    from services.onnx.runtime import OnnxRuntime

    port = _free_port()
    settings = settings_for(repo_copy, control_plane=f"127.0.0.1:{port}", family="onnx")
    srv = ServerThread(settings, [OnnxRuntime]).start()
    registry: RegistryThread | None = None
    try:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        assert client.is_server_ready()  # serving without the control plane
        client.close()
        registry = RegistryThread(port).start()
        (inst,) = registry.wait_until(lambda i: len(i) == 1, timeout=5)
        assert ("simple", "1") in _ready((inst,))
    finally:
        srv.stop()
        if registry is not None:
            assert registry.instances() == ()
            registry.stop()
