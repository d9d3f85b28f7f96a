"""The embedded registry: leases on a fake clock, versions, and the gRPC servicer's validation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from control_plane.model import ModelVersion, ServiceInstance
from control_plane.registry import Registry, RegistryServicer, clamp_ttl
from protos.gen.meshserve import registry_pb2 as rpb
from protos.gen.meshserve import registry_pb2_grpc as rgrpc


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def instance(iid: str = "onnx-h-1", *models: ModelVersion) -> ServiceInstance:
    return ServiceInstance(iid, "onnx", "127.0.0.1", 9001, 9000, 9002, models)


READY_1 = ModelVersion("simple", "1", "READY", platform="onnxruntime_onnx")


def test_ttl_is_defaulted_and_clamped() -> None:
    assert clamp_ttl(0) == 3.0
    assert clamp_ttl(0.2) == 1.0
    assert clamp_ttl(500) == 60.0
    assert clamp_ttl(7.5) == 7.5


def test_register_lists_instances_sorted_and_bumps_version() -> None:
    reg = Registry(clock=FakeClock())
    assert reg.version == 0
    assert reg.register(instance("b")) == 3.0
    assert reg.register(instance("a"), ttl_s=0.1) == 1.0
    assert [i.id for i in reg.instances()] == ["a", "b"]
    assert reg.version == 2


def test_heartbeat_that_changes_nothing_does_not_bump_version() -> None:
    clock = FakeClock()
    reg = Registry(clock=clock)
    reg.register(instance("a", READY_1, ModelVersion("other", "2", "READY")))
    v = reg.version
    clock.now += 2
    # same state, models listed in another order: only the lease is renewed
    reg.register(instance("a", ModelVersion("other", "2", "READY"), READY_1))
    assert reg.version == v
    clock.now += 2.5  # 4.5 s after the first Register, 2.5 s after the heartbeat
    assert reg.expire() == []
    assert [i.id for i in reg.instances()] == ["a"]


def test_state_change_bumps_version() -> None:
    reg = Registry(clock=FakeClock())
    reg.register(instance("a", READY_1))
    v = reg.version
    reg.register(instance("a", ModelVersion("simple", "1", "UNLOADING")))
    assert reg.version == v + 1
    assert reg.instances()[0].ready_versions() == []


def test_lease_runs_out_and_instance_expires() -> None:
    clock = FakeClock()
    reg = Registry(clock=clock)
    reg.register(instance("a"), ttl_s=2)
    reg.register(instance("b"), ttl_s=10)
    v = reg.version
    clock.now += 1.9
    assert reg.expire() == []
    clock.now += 0.1
    assert reg.expire() == ["a"]
    assert [i.id for i in reg.instances()] == ["b"]
    assert reg.version == v + 1
    assert reg.expire(clock.now + 100) == ["b"]
    assert reg.instances() == ()


def test_deregister_unknown_is_not_an_error() -> None:
    reg = Registry(clock=FakeClock())
    reg.register(instance("a"))
    v = reg.version
    assert reg.deregister("nope") is False
    assert reg.version == v
    assert reg.deregister("a") is True
    assert reg.version == v + 1


async def test_wait_changed_wakes_on_change_only() -> None:
    reg = Registry(clock=FakeClock())
    waiter = asyncio.create_task(reg.wait_changed(reg.version))
    await asyncio.sleep(0)  # let it start waiting (no wall-clock time passes)
    assert not waiter.done()
    reg.register(instance("a"))
    assert await asyncio.wait_for(waiter, 5) == 1
    # already behind: returns at once
    assert await reg.wait_changed(0) == 1


async def test_background_expiry_task_is_cancelled_on_close() -> None:
    clock = FakeClock()
    reg = Registry(clock=clock, sweep_interval_s=0.01)
    reg.register(instance("a"), ttl_s=1)
    reg.start()
    clock.now += 5
    await asyncio.wait_for(reg.wait_changed(1), 5)
    assert reg.instances() == ()
    await reg.close()


# ---- the gRPC servicer over a real grpc.aio server ---------------------------------------------
@pytest.fixture
async def stub() -> AsyncIterator[tuple[rgrpc.RegistryStub, Registry]]:
    reg = Registry(clock=FakeClock())
    server = grpc.aio.server()
    rgrpc.add_RegistryServicer_to_server(RegistryServicer(reg), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield rgrpc.RegistryStub(channel), reg  # type: ignore[no-untyped-call]
    await server.stop(0)


def _req(**fields: object) -> rpb.RegisterRequest:
    base: dict[str, object] = {
        "id": "onnx-h-1",
        "family": "onnx",
        "host": "127.0.0.1",
        "grpc_port": 9001,
        "http_port": 9000,
    }
    base.update(fields)
    return rpb.RegisterRequest(instance=rpb.ServiceInstance(**base))  # type: ignore[arg-type]


async def test_servicer_registers_and_applies_clamped_ttl(
    stub: tuple[rgrpc.RegistryStub, Registry],
) -> None:
    client, reg = stub
    req = _req(models=[rpb.ModelVersion(name="simple", version="1", state="READY")])
    req.lease_ttl_ms = 100
    reply = await client.Register(req)
    assert reply.lease_ttl_ms == 1000
    (only,) = reg.instances()
    assert only.id == "onnx-h-1" and only.grpc_port == 9001
    assert only.ready_versions() == [ModelVersion("simple", "1", "READY")]
    reply = await client.Register(_req())
    assert reply.lease_ttl_ms == 3000
    await client.Deregister(rpb.DeregisterRequest(id="onnx-h-1"))
    await client.Deregister(rpb.DeregisterRequest(id="never-registered"))
    assert reg.instances() == ()


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (rpb.RegisterRequest(), "instance must be set"),
        (_req(id=""), "instance.id"),
        (_req(family="", host=""), "instance.family, instance.host"),
        (_req(grpc_port=0), "grpc_port must be set"),
        (_req(host="vm"), "host 'vm' is not an IP address"),
        (_req(http_port=70000), "not a TCP port"),
        (_req(models=[rpb.ModelVersion(name="m", version="1", state="OK")]), "use one of"),
        (_req(models=[rpb.ModelVersion(name="m", state="READY")]), "must name its version"),
        (_req(models=[rpb.ModelVersion(version="1", state="READY")]), "needs a name"),
    ],
)
async def test_servicer_rejects_invalid_registrations(
    stub: tuple[rgrpc.RegistryStub, Registry], request_: rpb.RegisterRequest, says: str
) -> None:
    client, reg = stub
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.Register(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (err.value.details() or "")
    assert reg.instances() == ()
