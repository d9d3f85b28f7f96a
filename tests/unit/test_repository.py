"""Triton repository layout, version policies, change fingerprints, load-request file overrides."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from protos.gen.inference import model_config_pb2 as mc
from services.core.config import load_config_file
from services.core.errors import ModelLoadError, NotFound
from services.core.repository import (
    fingerprint,
    scan_model,
    scan_repository,
    select_versions,
    version_fingerprint,
    write_override_files,
)


def _model(root: Path, name: str, versions: list[str], config: str | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.pbtxt").write_text(config)
    for v in versions:
        (path / v).mkdir()
        (path / v / "model.onnx").write_bytes(b"onnx-" + v.encode())
    return path


def test_scan_repository_follows_triton_layout(tmp_path: Path) -> None:
    _model(tmp_path, "simple", ["1", "2", "10", "0", "01", "latest", ".3"], 'name: "simple"')
    _model(tmp_path, "noconfig", ["1"])
    _model(tmp_path, ".hidden", ["1"])
    (tmp_path / "README.md").write_text("not a model")
    (tmp_path / "simple" / "7").write_text("a file, not a version folder")

    models = scan_repository(tmp_path)

    assert sorted(models) == ["noconfig", "simple"]
    simple = models["simple"]
    assert simple.name == "simple" and simple.path == tmp_path / "simple"
    assert sorted(simple.versions) == [1, 2, 10]
    assert simple.versions[10] == tmp_path / "simple" / "10"
    assert simple.config_path == tmp_path / "simple" / "config.pbtxt"
    assert models["noconfig"].config_path is None


def test_scan_errors_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"model repository .* does not exist"):
        scan_repository(tmp_path / "nope")
    with pytest.raises(NotFound, match=r"model folder .* does not exist"):
        scan_model(tmp_path / "nope")


def _policy(text: str) -> mc.ModelVersionPolicy:
    policy = mc.ModelVersionPolicy()
    if text == "latest2":
        policy.latest.num_versions = 2
    elif text == "all":
        policy.all.SetInParent()
    elif text == "specific":
        policy.specific.versions.extend([3, 1, 9])
    return policy


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("unset", [7]), ("latest2", [3, 7]), ("all", [1, 2, 3, 7]), ("specific", [1, 3])],
)
def test_select_versions(policy: str, expected: list[int]) -> None:
    assert select_versions(_policy(policy), [3, 1, 7, 2]) == expected


def test_select_versions_edge_cases() -> None:
    assert select_versions(_policy("latest2"), []) == []
    assert select_versions(_policy("specific"), [2]) == []  # listed versions absent: nothing
    zero = mc.ModelVersionPolicy()
    zero.latest.num_versions = 0
    assert select_versions(zero, [1, 2]) == []


def _touch(path: Path, data: bytes) -> None:
    """Rewrite a file and move its mtime forward, as a later edit on a coarse clock would."""
    stat = path.stat() if path.exists() else None
    path.write_bytes(data)
    if stat is not None:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_fingerprint_tracks_versions_and_config(tmp_path: Path) -> None:
    path = _model(tmp_path, "m", ["1", "2"], 'name: "m"')
    first = fingerprint(path)
    v1_first = version_fingerprint(path / "1")
    assert fingerprint(path) == first  # stable when nothing changes

    (path / "3").mkdir()
    (path / "3" / "model.onnx").write_bytes(b"x")
    added = fingerprint(path)
    assert added != first

    _touch(path / "2" / "model.onnx", b"changed weights")
    changed = fingerprint(path)
    assert changed != added
    assert version_fingerprint(path / "1") == v1_first  # untouched version keeps its print

    (path / "3" / "model.onnx").unlink()
    (path / "3").rmdir()
    removed = fingerprint(path)
    assert removed not in (added, changed)

    _touch(path / "config.pbtxt", b'name: "m" max_batch_size: 4')
    assert fingerprint(path) != removed

    _touch(path / "1" / "model.onnx", b"new v1")
    assert version_fingerprint(path / "1") != v1_first


def test_fingerprint_ignores_hidden_files(tmp_path: Path) -> None:
    path = _model(tmp_path, "m", ["1"])
    before = fingerprint(path)
    (path / ".DS_Store").write_bytes(b"junk")
    (path / "1" / ".model.onnx.swp").write_bytes(b"junk")
    assert fingerprint(path) == before


def test_write_override_files_builds_private_model_folder(tmp_path: Path) -> None:
    repo_dir = _model(tmp_path, "simple", ["1"], 'name: "simple"')
    config = mc.ModelConfig(name="simple", backend="onnxruntime", max_batch_size=2)
    files = {"file:1/model.onnx": b"new model", "2/sub/extra.bin": b"\x00\x01"}

    temp = write_override_files(repo_dir, files, config)

    assert temp != repo_dir and temp.is_dir()
    assert (temp / "1" / "model.onnx").read_bytes() == b"new model"
    assert (temp / "2" / "sub" / "extra.bin").read_bytes() == b"\x00\x01"
    assert load_config_file(temp / "config.pbtxt") == config
    assert sorted(scan_model(temp).versions) == [1, 2]
    assert (repo_dir / "1" / "model.onnx").read_bytes() == b"onnx-1"  # repository untouched


@pytest.mark.parametrize("bad", ["../escape.onnx", "/etc/passwd", "file:1/../../x", "", "1\\x"])
def test_write_override_files_rejects_escaping_paths(tmp_path: Path, bad: str) -> None:
    before = set(Path(tempfile.gettempdir()).glob("meshserve-m-*"))
    with pytest.raises(ModelLoadError, match="must be a relative path inside the model folder"):
        write_override_files(tmp_path / "m", {"1/model.onnx": b"ok", bad: b"bad"})
    after = set(Path(tempfile.gettempdir()).glob("meshserve-m-*"))
    assert after == before  # nothing left behind
