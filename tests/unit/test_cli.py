"""The `meshserve` command line: what `up` turns its arguments into, and argument errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deploy.cli import _mirror, _mirror_line, _split, build_parser, up_settings
from deploy.supervisor import service_argv
from services.core.settings import settings_from_args


def test_up_arguments_become_mesh_settings(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "up",
            "--model-repository",
            str(tmp_path),
            "--grpc-port",
            "9001",
            "--model-control-mode",
            "explicit",
            "--load-model",
            "*",
            "--load-model",
            "simple",
            "--gateway-workers",
            "1",
        ]
    )
    s = up_settings(args)
    assert s.repository == tmp_path.resolve()
    assert (s.grpc_port, s.http_port, s.metrics_port, s.control_port) == (9001, 8000, 8002, 8010)
    assert s.model_control_mode == "explicit"
    assert s.load_models == ("*", "simple")
    assert s.gateway_workers == 1
    assert s.cache_config == ()


def _up(tmp_path: Path, *more: str) -> argparse.Namespace:
    """`meshserve up` with a cache and a metrics setting, and ``more``."""
    cache, metrics = "local,size=4096", "summary_latencies=true"
    flags = ["--cache-config", cache, "--metrics-config", metrics, *more]
    return build_parser().parse_args(["up", "--model-repository", str(tmp_path), *flags])


def test_up_passes_cache_and_metrics_configs_and_refuses_bad_ones(tmp_path: Path) -> None:
    args = _up(tmp_path)
    assert up_settings(args).cache_config == ("local,size=4096",)
    assert up_settings(args).metrics_config == ("summary_latencies=true",)
    args = build_parser().parse_args(
        ["up", "--model-repository", str(tmp_path), "--metrics-config", "nope=1"]
    )
    with pytest.raises(SystemExit, match="unknown setting 'nope'"):
        up_settings(args)
    args = build_parser().parse_args(
        ["up", "--model-repository", str(tmp_path), "--cache-config", "redis,host=x"]
    )
    with pytest.raises(SystemExit, match="only the 'local' cache"):
        up_settings(args)


def test_each_service_gets_the_mesh_wide_settings(tmp_path: Path) -> None:
    args = _up(tmp_path, "--strict-model-config=true", "--load-model", "simple")
    argv = service_argv(up_settings(args), "onnx")
    assert argv[1:3] == ["-m", "services.onnx"]
    service = settings_from_args(argv[3:], "svc")  # the service itself accepts them all
    assert service.auto_complete_config is False
    assert service.response_cache_bytes == 4096
    assert service.metrics_config.summary_latencies
    assert service.startup_models == ("simple",)
    assert service.control_plane == "127.0.0.1:8010"


def test_up_refuses_a_missing_repository(tmp_path: Path) -> None:
    args = build_parser().parse_args(["up", "--model-repository", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="is not a folder"):
        up_settings(args)


def test_split_arguments_must_be_version_equals_weight() -> None:
    with pytest.raises(SystemExit, match="VERSION=WEIGHT"):
        _split("http://127.0.0.1:1", "simple", ["1:90"], clear=False)


def test_mirror_arguments() -> None:
    a = build_parser().parse_args(["mirror", "simple", "2", "--percent", "12.5"])
    assert (a.command, a.model, a.version, a.percent, a.off) == (
        "mirror",
        "simple",
        "2",
        12.5,
        False,
    )
    a = build_parser().parse_args(["mirror", "simple", "2"])
    assert a.percent == 100.0
    a = build_parser().parse_args(["mirror", "simple", "--off"])
    assert (a.version, a.off) == (None, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mirror", "simple", "2", "--percent", "ten"])


@pytest.mark.parametrize(("version", "off"), [(None, False), ("2", True)])
def test_mirror_needs_a_version_or_off(version: str | None, off: bool) -> None:
    with pytest.raises(SystemExit, match=r"VERSION.*--off"):
        _mirror("http://127.0.0.1:1", "simple", version, 10.0, off)


def test_mirror_status_lines() -> None:
    active = {"version": "2", "percent": 12.5, "active": True, "reason": ""}
    assert _mirror_line("simple", active) == "mirror simple: 12.5% to version 2 (active)"
    idle = {"version": "3", "percent": 100.0, "active": False, "reason": "not READY"}
    assert _mirror_line("simple", idle) == "mirror simple: 100% to version 3 (inactive: not READY)"
