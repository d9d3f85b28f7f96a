"""What tritonserver's flags change, below the command line: the auto-complete default
max_batch_size (--backend-config default-max-batch-size), the log format and file
(--log-format, --log-file, LogSettings), and strict readiness at the gateway's front."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.front_core import Front
from control_plane.model import MeshState, ModelVersion, ServiceInstance
from examples.build_repository import build_repository
from services.core import repository as repo
from services.core.errors import InvalidArgument
from services.core.log_settings import apply_log_settings, configure_logging, log_formatter
from services.core.model_prep import prepare_config
from services.onnx.runtime import OnnxRuntime


def _completed_max_batch(root: Path, default: int | None) -> tuple[int, list[int]]:
    """``simple`` with no config.pbtxt, completed from its ONNX file: max_batch_size and the
    dims of INPUT0."""
    (root / "simple" / "config.pbtxt").unlink()
    prepared = prepare_config(
        [OnnxRuntime],
        "simple",
        repo.scan_model(root / "simple"),
        None,
        default_max_batch_size=None if default is None else (lambda backend: default),
    )
    assert prepared is not None
    config = prepared[0]
    return config.max_batch_size, list(config.input[0].dims)


@pytest.mark.parametrize(("default", "expected"), [(None, 4), (16, 16), (1, 1)])
def test_backend_config_sets_the_max_batch_size_auto_complete_gives(
    tmp_path: Path, default: int | None, expected: int
) -> None:
    build_repository(tmp_path, ["simple"])
    assert _completed_max_batch(tmp_path, default) == (expected, [16])


def test_default_max_batch_size_zero_completes_an_unbatched_model(tmp_path: Path) -> None:
    build_repository(tmp_path, ["simple"])
    # no batching: the first dimension is part of the tensor's shape again
    assert _completed_max_batch(tmp_path, 0) == (0, [-1, 16])


def test_a_written_max_batch_size_is_kept(tmp_path: Path) -> None:
    build_repository(tmp_path, ["simple"])
    prepared = prepare_config(
        [OnnxRuntime],
        "simple",
        repo.scan_model(tmp_path / "simple"),
        None,
        default_max_batch_size=lambda backend: 2,
    )
    assert prepared is not None and prepared[0].max_batch_size == 8


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    services_level = logging.getLogger("services").level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("services").setLevel(services_level)


@pytest.mark.usefixtures("restore_logging")
def test_log_file_format_and_levels_from_the_flags(tmp_path: Path) -> None:
    path = tmp_path / "service.log"
    initial = {"log_file": str(path), "log_format": "ISO8601", "log_verbose_level": 1}
    configure_logging("INFO", initial)
    logging.getLogger("services.test").debug("verbose line for model %r", "simple")
    logging.getLogger("services.test").info("info line")
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = path.read_text().splitlines()
    assert len(lines) == 2, lines
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.match(rf"{iso} DEBUG services.test: verbose line for model 'simple'$", lines[0])
    assert re.match(rf"{iso} INFO services.test: info line$", lines[1])

    # at run time: the format changes the handlers; the file cannot be changed, only named again
    state = dict(initial)
    apply_log_settings(state, {"log_format": "default", "log_file": str(path)})
    assert not logging.getLogger().handlers[0].formatter.datefmt  # type: ignore[union-attr]
    with pytest.raises(InvalidArgument, match="start the service with --log-file"):
        apply_log_settings(state, {"log_file": str(tmp_path / "other.log")})
    with pytest.raises(InvalidArgument, match="start the service with --log-file"):
        apply_log_settings({}, {"log_file": "/tmp/anything.log"})


@pytest.mark.usefixtures("restore_logging")
def test_log_info_off_keeps_warnings() -> None:
    configure_logging("INFO", {"log_info": False})
    assert logging.getLogger("services").getEffectiveLevel() == logging.WARNING
    configure_logging("INFO", {})
    assert logging.getLogger().level == logging.INFO


def test_iso8601_times_are_utc() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = 0.0
    assert log_formatter("ISO8601").format(record).startswith("1970-01-01T00:00:00Z INFO x: m")


def _front(strict: bool, *models: ModelVersion) -> Front:
    instance = ServiceInstance("a", "onnx", "127.0.0.1", 1, 2, models=models)
    return Front(lambda: MeshState(instances=(instance,)), strict_readiness=strict)


def test_strict_readiness_at_the_front_needs_every_version_ready() -> None:
    ready = ModelVersion("simple", "1", "READY")
    failed = ModelVersion("broken", "", "UNAVAILABLE", "not a valid ONNX model")
    unloaded = ModelVersion("mlp", "1", "UNAVAILABLE", "unloaded")
    loading = ModelVersion("cnn", "1", "LOADING")
    assert _front(False, ready, failed).ready()
    assert not _front(True, ready, failed).ready()
    assert _front(True, ready, unloaded).ready()
    assert not _front(False, ready, loading).ready()
    assert not _front(True, ready, loading).ready()
    assert not Front(lambda: MeshState(), strict_readiness=True).ready()
