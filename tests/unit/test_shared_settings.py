"""The control plane's book of log and trace settings changed through the gateway: what it records
from gRPC and REST updates, and what it says a joining instance still lacks; then ``catch_up``
and the front's booking against real services."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from control_plane.front import add_front_to_server
from control_plane.front_core import Front
from control_plane.model import MeshState, ServiceInstance
from control_plane.shared_settings import (
    GLOBAL_TRACE,
    LOG,
    Scope,
    SettingsBook,
    catch_up,
    log_values_from_json,
)
from protos.gen.inference import grpc_service_pb2 as pb
from protos.gen.inference import grpc_service_pb2_grpc as pbg
from tests.support import ServerThread, settings_for


def _instance(name: str, grpc_port: int = 1) -> ServiceInstance:
    return ServiceInstance(
        id=name, family="onnx", host="127.0.0.1", grpc_port=grpc_port, http_port=2
    )


A, B, C = _instance("a"), _instance("b"), _instance("c")


def _log(**settings: bool | int | str) -> pb.LogSettingsRequest:
    request = pb.LogSettingsRequest()
    for key, value in settings.items():
        if isinstance(value, bool):
            request.settings[key].bool_param = value
        elif isinstance(value, int):
            request.settings[key].uint32_param = value
        else:
            request.settings[key].string_param = value
    return request


def _trace(model: str = "", **settings: list[str]) -> pb.TraceSettingRequest:
    request = pb.TraceSettingRequest(model_name=model)
    for key, values in settings.items():
        request.settings[key].value.extend(values)
    return request


def _missing(book: SettingsBook, *instances: ServiceInstance) -> set[tuple[str, str]]:
    return {(r.instance.id, str(r.scope)) for r in book.missing(instances)}


def test_updates_merge_a_later_value_overrides_and_a_cleared_trace_setting_leaves() -> None:
    book = SettingsBook()
    book.log_updated(_log(log_verbose_level=1, log_info=False), [A])
    book.log_updated(_log(log_verbose_level=2, log_format="ISO8601"), [A])
    assert book.log_settings() == {
        "log_verbose_level": 2,
        "log_info": False,
        "log_format": "ISO8601",
    }
    book.trace_updated(_trace(trace_rate=["4"], trace_level=["TIMESTAMPS"]), [A])
    book.trace_updated(_trace(trace_rate=["8"], trace_count=["3"]), [A])
    book.trace_updated(_trace("simple", trace_rate=["2"]), [A])
    book.trace_updated(_trace(trace_level=[], trace_count=[]), [A])  # cleared: to the default
    assert book.trace_settings() == {"": {"trace_rate": ["8"]}, "simple": {"trace_rate": ["2"]}}
    book.trace_updated(_trace("simple", trace_rate=[]), [A])  # the model's override goes
    assert book.trace_settings() == {"": {"trace_rate": ["8"]}}
    book.log_updated(
        pb.LogSettingsRequest(settings={"log_error": pb.LogSettingsRequest.SettingValue()}), [A]
    )
    assert "log_error" not in book.log_settings()  # no value set: the services ignore it too


def test_a_joining_instance_gets_one_request_per_scope_with_everything_booked() -> None:
    book = SettingsBook()
    book.log_updated(_log(log_verbose_level=1), [A])
    book.log_updated(_log(log_warning=False), [A])
    book.trace_updated(_trace(trace_rate=["4"]), [A])
    book.trace_updated(_trace("simple", trace_count=["5"]), [A])
    assert _missing(book, A) == set()
    replays = {r.scope: r for r in book.missing([A, B])}
    assert set(replays) == {LOG, GLOBAL_TRACE, Scope(trace=True, model="simple")}
    assert {r.instance.id for r in replays.values()} == {"b"}
    log_request = replays[LOG].request
    assert isinstance(log_request, pb.LogSettingsRequest)
    assert log_request.settings["log_verbose_level"].uint32_param == 1
    assert log_request.settings["log_warning"].WhichOneof("parameter_choice") == "bool_param"
    model_request = replays[Scope(trace=True, model="simple")].request
    assert isinstance(model_request, pb.TraceSettingRequest)
    assert model_request.model_name == "simple"
    assert list(model_request.settings["trace_count"].value) == ["5"]
    book.made(replays[LOG])
    assert _missing(book, A, B) == {
        ("b", "global trace settings"),
        ("b", "trace settings of model 'simple'"),
    }


def test_an_update_made_on_a_lagging_instance_does_not_make_it_current() -> None:
    book = SettingsBook()
    book.log_updated(_log(log_verbose_level=1), [A])
    # b joined and was not caught up yet when the next update reached both
    book.log_updated(_log(log_info=False), [A, B])
    assert _missing(book, A, B) == {("b", "log settings")}
    # an update of every booked key leaves nothing for b to lack
    book.log_updated(_log(log_verbose_level=0, log_info=True), [A, B])
    assert _missing(book, A, B) == set()


def test_a_replay_overtaken_by_a_later_update_does_not_count() -> None:
    book = SettingsBook()
    book.trace_updated(_trace(trace_rate=["4"]), [A])
    [stale] = book.missing([A, B])
    book.trace_updated(_trace(trace_count=["2"]), [A])
    book.made(stale)
    [fresh] = book.missing([A, B])
    assert fresh.instance.id == "b" and fresh.version == stale.version + 1
    assert isinstance(fresh.request, pb.TraceSettingRequest)
    assert set(fresh.request.settings) == {"trace_rate", "trace_count"}


def test_a_departed_instance_is_forgotten() -> None:
    book = SettingsBook()
    book.log_updated(_log(log_verbose_level=1), [A, B])
    assert _missing(book, A, B, C) == {("c", "log settings")}
    book.missing([A, C])  # b left ...
    assert _missing(book, A, B) == {("b", "log settings")}  # ... and comes back as a stranger


def test_rest_updates_are_booked_as_the_services_take_them() -> None:
    book = SettingsBook()
    body = json.dumps({"log_verbose_level": 1, "log_info": False, "log_format": "ISO8601"})
    book.rest_call("/v2/logging", body.encode(), 400, [A])  # refused by a service: not booked
    assert book.log_settings() == {}
    book.rest_call("/v2/logging", body.encode(), 200, [A])
    [replay] = book.missing([A, B])
    assert isinstance(replay.request, pb.LogSettingsRequest)
    kinds = {k: v.WhichOneof("parameter_choice") for k, v in replay.request.settings.items()}
    assert kinds == {
        "log_verbose_level": "uint32_param",
        "log_info": "bool_param",
        "log_format": "string_param",
    }
    trace = {"trace_rate": "4", "trace_count": 2, "trace_level": ["TIMESTAMPS"]}
    book.rest_call("/v2/trace/setting", json.dumps(trace).encode(), 200, [A])
    assert book.trace_settings() == {
        "": {"trace_rate": ["4"], "trace_count": ["2"], "trace_level": ["TIMESTAMPS"]}
    }
    book.rest_call("/v2/trace/setting", b'{"trace_count": null}', 200, [A])  # null clears
    assert book.trace_settings() == {"": {"trace_rate": ["4"], "trace_level": ["TIMESTAMPS"]}}
    book.rest_call("/v2/trace/setting", b'{"trace_rate": "1"}', 503, [A])
    book.rest_call("/v2/models/simple/trace/setting", b'{"trace_rate": "1"}', 200, [A])
    assert book.trace_settings() == {
        "": {"trace_rate": ["4"], "trace_level": ["TIMESTAMPS"]},
        "simple": {"trace_rate": ["1"]},
    }
    book.rest_call("/v2/models/simple/stats", b'{"trace_rate": "9"}', 200, [A])  # not settings
    assert book.trace_settings()["simple"] == {"trace_rate": ["1"]}


def test_rest_log_values_without_a_log_settings_form_are_left_out() -> None:
    values = log_values_from_json({"log_verbose_level": -1, "log_error": True, "x": 1.5})
    assert set(values) == {"log_error"}
    assert values["log_error"].bool_param is True


# ---- catch_up and the front's booking, against real services -----------------------------------
@dataclass
class _Mesh:
    front: Front
    stub: pbg.GRPCInferenceServiceStub
    services: list[ServiceInstance]
    instances: list[ServiceInstance]


@pytest.fixture
def restore_log_levels() -> Iterator[None]:
    """LogSettings sets this process's loggers (the services run in it): put them back."""
    loggers = [logging.getLogger(n) for n in ("services", "control_plane")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.fixture
async def mesh(tmp_path: Path, restore_log_levels: None) -> AsyncIterator[_Mesh]:
    """Two real services (empty repositories), the first registered; the front's gRPC servicer
    on port 0 over the registered ones."""
    threads: list[ServerThread] = []
    services: list[ServiceInstance] = []
    instances: list[ServiceInstance] = []
    front = Front(lambda: MeshState(instances=tuple(instances)))
    server = grpc.aio.server()
    add_front_to_server(front, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        for n in range(2):
            threads.append(ServerThread(settings_for(tmp_path), []).start())
            running = threads[-1].running
            assert running is not None
            services.append(_instance(f"s{n}", running.grpc_port))
        instances.append(services[0])
        yield _Mesh(front, pbg.GRPCInferenceServiceStub(channel), services, instances)
    finally:
        await channel.close()
        await server.stop(1)
        await front.close()
        for thread in threads:
            thread.stop()


async def _log_on(front: Front, instance: ServiceInstance) -> dict[str, object]:
    answer = await front.call(
        instance, "LogSettings", pb.LogSettingsRequest(), pb.LogSettingsResponse
    )
    return {
        k: getattr(v, v.WhichOneof("parameter_choice") or "") for k, v in answer.settings.items()
    }


async def test_a_service_that_joins_gets_what_the_front_booked_and_not_what_failed(
    mesh: _Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    await mesh.stub.LogSettings(_log(log_verbose_level=3))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.stub.LogSettings(_log(log_format="ISO8601", log_file="/tmp/x"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mesh.front.shared_settings.log_settings() == {"log_verbose_level": 3}

    joining = mesh.services[1]
    assert (await _log_on(mesh.front, joining))["log_verbose_level"] == 0
    with socket.socket() as s:  # a port nothing listens on: an instance that cannot be reached
        s.bind(("127.0.0.1", 0))
        unreachable = _instance("unreachable", s.getsockname()[1])
    mesh.instances.extend([joining, unreachable])
    with caplog.at_level(logging.WARNING, "control_plane.shared_settings"):
        await catch_up(mesh.front)
    settings = await _log_on(mesh.front, joining)
    assert (settings["log_verbose_level"], settings["log_format"]) == (3, "default")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "unreachable" in warning and "log_verbose_level" in warning, warning
    # asked again at the next registry change; the one that has them is not
    assert [r.instance.id for r in mesh.front.shared_settings.missing(mesh.instances)] == [
        "unreachable"
    ]
