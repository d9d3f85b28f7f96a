"""--disable-auto-complete-config / --strict-model-config (Triton's flags): with auto-complete
off a config is loaded as written, and one that leaves out what auto-complete would fill is
refused with the reason; both flags parse on a service and on `meshserve up`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import text_format

from deploy.cli import build_parser, up_settings
from examples.build_repository import build_repository
from protos.gen.inference import model_config_pb2 as mc
from services.core import repository as repo
from services.core.config import load_config_file
from services.core.errors import ModelLoadError
from services.core.model_prep import prepare_config
from services.core.runtime import Runtime
from services.core.settings import settings_from_args
from services.onnx.runtime import OnnxRuntime


@pytest.fixture
def models(tmp_path: Path) -> Path:
    build_repository(tmp_path, ["simple"])
    return tmp_path


def _prepare(root: Path, auto_complete: bool) -> tuple[mc.ModelConfig, type[Runtime]] | None:
    return prepare_config(
        [OnnxRuntime], "simple", repo.scan_model(root / "simple"), None, auto_complete=auto_complete
    )


def test_a_whole_config_loads_as_written(models: Path) -> None:
    prepared = _prepare(models, auto_complete=False)
    assert prepared is not None
    config, runtime = prepared
    assert runtime is OnnxRuntime
    assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
    assert config.max_batch_size == 8


def test_without_outputs_only_auto_complete_fills_them(models: Path) -> None:
    path = models / "simple" / "config.pbtxt"
    config = load_config_file(path)
    del config.output[:]
    path.write_text(text_format.MessageToString(config))
    prepared = _prepare(models, auto_complete=True)
    assert prepared is not None
    assert [o.name for o in prepared[0].output] == ["OUTPUT0", "OUTPUT1"]
    with pytest.raises(ModelLoadError) as info:
        _prepare(models, auto_complete=False)
    message = info.value.message
    assert "model 'simple'" in message and "--disable-auto-complete-config" in message
    assert "lacks its outputs" in message


def test_without_a_config_file_the_model_is_refused(models: Path) -> None:
    (models / "simple" / "config.pbtxt").unlink()
    assert _prepare(models, auto_complete=True) is not None
    lacks = "lacks a config.pbtxt and its inputs and its outputs"
    with pytest.raises(ModelLoadError, match=re.escape(lacks)):
        _prepare(models, auto_complete=False)


@pytest.mark.parametrize(
    ("flags", "auto_complete"),
    [
        ([], True),
        (["--disable-auto-complete-config"], False),
        (["--strict-model-config"], False),
        (["--strict-model-config=true"], False),
        (["--strict-model-config=false"], True),
        (["--strict-model-config", "True"], False),
    ],
)
def test_both_flags_on_a_service_and_on_meshserve_up(
    tmp_path: Path, flags: list[str], auto_complete: bool
) -> None:
    service = settings_from_args(["--model-repository", str(tmp_path), *flags], "svc")
    assert service.auto_complete_config is auto_complete
    up = up_settings(build_parser().parse_args(["up", "--model-repository", str(tmp_path), *flags]))
    assert up.auto_complete_config is auto_complete


@pytest.mark.parametrize(
    "flags",
    [
        ["--strict-model-config=maybe"],
        ["--disable-auto-complete-config", "--strict-model-config=0"],
    ],
)
def test_bad_or_disagreeing_flags_are_refused(
    tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        settings_from_args(["--model-repository", str(tmp_path), *flags], "svc")
    assert "--strict-model-config" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="strict-model-config"):
        up_settings(build_parser().parse_args(["up", "--model-repository", str(tmp_path), *flags]))
