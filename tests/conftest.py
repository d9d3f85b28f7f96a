"""Shared fixtures: the example repository (built once per session) and running services."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.native_front import front_binary
from tests.support import ServerThread, settings_for

#: the gRPC transports a service can run here: grpc_front where built (make native), and grpc.aio
GRPC_FRONTENDS = ("native", "aio") if front_binary() is not None else ("aio",)


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples.build_repository import build_repository

    root = tmp_path_factory.mktemp("example_models")
    build_repository(root)
    return root


@pytest.fixture
def repo_copy(example_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the example repository that a test may change."""
    dst = tmp_path / "models"
    shutil.copytree(example_repo, dst)
    return dst


@pytest.fixture(scope="module", params=GRPC_FRONTENDS)
def grpc_frontend(request: pytest.FixtureRequest) -> str:
    """Each gRPC transport in turn, for the modules that check the gRPC surface on both."""
    return str(request.param)


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The ONNX service over the example repository, control mode none (shared by a module)."""
    from examples.build_repository import build_repository
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("served_models")
    build_repository(root)
    with ServerThread(settings_for(root), [OnnxRuntime]) as server:
        yield server
