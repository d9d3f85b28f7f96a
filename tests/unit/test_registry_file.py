"""The embedded registry across a control-plane restart: saved to a file, restored on short
leases, and a restarted control plane that configures Envoy from it at once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from control_plane.app import ControlPlane, ControlPlaneSettings
from control_plane.model import ModelVersion, ServiceInstance
from control_plane.registry import Registry
from control_plane.registry_file import load_instances, save_instances
from control_plane.snapshot import CLUSTER


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def instance(iid: str, port: int = 9001) -> ServiceInstance:
    models = (
        ModelVersion("simple", "1", "READY", platform="onnxruntime_onnx"),
        ModelVersion("broken", "1", "UNAVAILABLE", reason="bad model file"),
    )
    return ServiceInstance(iid, "onnx", "127.0.0.1", port, port + 1, port + 2, models)


def test_instances_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.json"
    saved = (instance("onnx-a"), instance("onnx-b", 9101))
    save_instances(path, saved)
    assert load_instances(path) == saved
    assert [p.name for p in path.parent.iterdir()] == ["registry.json"]  # no temporary left


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"services": []}),
        json.dumps({"instances": [{"id": "x"}]}),
        json.dumps({"instances": [{"id": "x", "family": "onnx", "host": 1, "grpc_port": 1}]}),
        json.dumps(
            {
                "instances": [
                    {
                        "id": "x",
                        "family": "onnx",
                        "host": "127.0.0.1",
                        "grpc_port": "9001",
                        "http_port": 0,
                    }
                ]
            }
        ),
    ],
)
def test_an_unreadable_file_is_logged_and_ignored(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "registry.json"
    path.write_text(text)
    with caplog.at_level(logging.ERROR):
        assert load_instances(path) is None
    assert f"cannot read the saved registry {path}" in caplog.text


def test_no_file_is_nothing_to_restore(tmp_path: Path) -> None:
    assert load_instances(tmp_path / "registry.json") is None


def test_restored_instances_keep_serving_until_they_re_register_or_their_grace_ends() -> None:
    clock = FakeClock()
    reg = Registry(clock=clock)
    back, gone = instance("onnx-back"), instance("onnx-gone", 9101)
    reg.restore([back, gone], grace_s=10.0)
    assert [i.id for i in reg.instances()] == ["onnx-back", "onnx-gone"]
    version = reg.version
    clock.now += 4.0
    reg.register(back, ttl_s=3.0)  # the same state it had: a lease renewal, no new version
    assert reg.version == version
    clock.now += 5.0  # 9 s after the restore; the one that re-registered renews as usual
    reg.register(back, ttl_s=3.0)
    assert reg.expire() == []
    clock.now += 1.0  # the grace ends for the one that never came back
    assert reg.expire() == ["onnx-gone"]
    assert [i.id for i in reg.instances()] == ["onnx-back"]


def plane(tmp_path: Path, registry_file: Path | None) -> ControlPlane:
    return ControlPlane(
        ControlPlaneSettings(
            policy_file=tmp_path / "policies.json", registry_file=registry_file, warmup_secs=3.0
        )
    )


def test_a_restart_with_a_saved_registry_configures_envoy_at_once(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    first = plane(tmp_path, path)
    assert first.registry is not None
    first.registry.register(instance("onnx-a"))
    first._save_registry()  # what the reconcile loop does after every change
    [saved] = load_instances(path) or ()
    assert saved.id == "onnx-a" and set(saved.models) == set(instance("onnx-a").models)

    restarted = plane(tmp_path, path)
    version = restarted.publish()
    assert version is not None  # no warm-up: the saved state is what Envoy runs already
    snapshot = restarted.cache.current
    assert snapshot is not None and snapshot.version == version
    assert any("simple" in name for name in snapshot.names(CLUSTER))


def test_a_restart_without_one_waits_for_services_to_re_register(tmp_path: Path) -> None:
    restarted = plane(tmp_path, tmp_path / "registry.json")
    assert restarted.publish() is None  # warming up: Envoy keeps its last config meanwhile
