"""Shared fixtures: the example repository (built once per session) and running services."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerThread, settings_for


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


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The ONNX service over the example repository, control mode none (shared by a module)."""
    from examples.build_repository import build_repository
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("served_models")
    build_repository(root)
    server = ServerThread(settings_for(root), [OnnxRuntime]).start()
    try:
        yield server
    finally:
        server.stop()
