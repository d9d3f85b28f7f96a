"""The `meshserve` command line: what `up` turns its arguments into, and argument errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.cli import _split, build_parser, up_settings


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


def test_up_refuses_a_missing_repository(tmp_path: Path) -> None:
    args = build_parser().parse_args(["up", "--model-repository", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="is not a folder"):
        up_settings(args)


def test_split_arguments_must_be_version_equals_weight() -> None:
    with pytest.raises(SystemExit, match="VERSION=WEIGHT"):
        _split("http://127.0.0.1:1", "simple", ["1:90"], clear=False)
