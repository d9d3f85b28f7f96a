"""The model repository on disk, in Triton's layout, and which versions of a model to serve.

Data flow: the model manager calls `scan_repository` at start-up and on each poll, `scan_model`
for one model, `select_versions` with the config's version policy to choose the version folders
to load, and `fingerprint` / `version_fingerprint` to notice added, changed and removed versions
and config edits. RepositoryModelLoad requests that carry files get a private copy of the model
folder from `write_override_files`.

Layout (as Triton):

    <root>/<model>/config.pbtxt          optional when the runtime can complete the config
    <root>/<model>/<version>/model.*     one folder per version, named by a positive integer

Hidden entries (".name") are ignored everywhere; so are plain files at the top level and version
folders whose name is not a positive integer or starts with "0" (Triton skips those too).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import InvalidArgument, ModelLoadError, NotFound

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.pbtxt"


@dataclass(frozen=True)
class ModelDir:
    """One model folder: its name, path and version folders by version number."""

    name: str
    path: Path
    versions: Mapping[int, Path] = field(default_factory=dict)

    @property
    def config_path(self) -> Path | None:
        """The folder's config.pbtxt, or None when there is none."""
        path = self.path / CONFIG_FILENAME
        return path if path.is_file() else None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def parse_version(name: str) -> int | None:
    """The version a folder name stands for, or None when Triton would skip the folder."""
    if not name.isascii() or not name.isdigit() or name.startswith("0"):
        return None
    return int(name)


def scan_model(path: Path) -> ModelDir:
    """Read one model folder; its name is the folder's name."""
    path = Path(path)
    if not path.is_dir():
        raise NotFound(f"model folder {path} does not exist or is not a directory")
    versions: dict[int, Path] = {}
    for entry in sorted(path.iterdir()):
        if _is_hidden(entry.name) or not entry.is_dir():
            continue
        number = parse_version(entry.name)
        if number is None:
            log.debug("ignoring %s: version folders are named by positive integers", entry)
            continue
        versions[number] = entry
    return ModelDir(name=path.name, path=path, versions=versions)


def scan_repository(root: Path) -> dict[str, ModelDir]:
    """Every model folder under `root`, by model name."""
    root = Path(root)
    if not root.is_dir():
        raise NotFound(
            f"model repository {root} does not exist or is not a directory; "
            "check --model-repository"
        )
    models: dict[str, ModelDir] = {}
    for entry in sorted(root.iterdir()):
        if _is_hidden(entry.name) or not entry.is_dir():
            continue
        models[entry.name] = scan_model(entry)
    return models


def select_versions(policy: mc.ModelVersionPolicy, available: Iterable[int]) -> list[int]:
    """The versions to serve under `policy`, ascending.

    latest { num_versions: N } → the N highest available (an unset policy means latest 1);
    all → every available version; specific { versions: [...] } → those listed that exist.
    As in Triton, a listed version without a folder is not an error for the model: the others
    load and the missing one is logged.
    """
    present = sorted(set(available))
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return present
    if choice == "specific":
        wanted = set(policy.specific.versions)
        for missing in sorted(wanted.difference(present)):
            log.error("version %d is named by the version policy but has no folder", missing)
        return [v for v in present if v in wanted]
    count = policy.latest.num_versions if choice == "latest" else 1
    return present[-count:] if count > 0 else []


def _listing(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under `path`, hidden entries skipped."""
    entries: list[tuple[str, int, int]] = []
    if not path.is_dir():
        return entries
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            full = Path(dirpath) / name
            try:
                stat = full.stat()
            except OSError:  # removed while we walked; the next poll sees the final state
                continue
            entries.append((full.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    return entries


def _digest(entries: Iterable[tuple[str, int, int]]) -> str:
    sha = hashlib.sha256()
    for rel, size, mtime in entries:
        sha.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return sha.hexdigest()


def fingerprint(model_dir_path: Path) -> str:
    """A digest of the model folder: config.pbtxt and every file of every version.

    Changes when a version is added, removed or changed, or the config is edited; equal strings
    mean nothing the server reads has changed (same paths, sizes and modification times).
    """
    return _digest(_listing(Path(model_dir_path)))


def version_fingerprint(version_path: Path) -> str:
    """A digest of one version folder's files, to reload only the versions that changed."""
    return _digest(_listing(Path(version_path)))


def _safe_relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name.removeprefix("file:"))
    if (
        not rel.parts
        or rel.is_absolute()
        or ".." in rel.parts
        or "\\" in name
        or any(_is_hidden(p) for p in rel.parts)
    ):
        raise ModelLoadError(
            f"file override '{name}' must be a relative path inside the model folder, "
            "e.g. 'file:1/model.onnx' (no '..', no absolute or hidden paths)"
        )
    return rel


def write_override_files(
    model_dir: Path, files: Mapping[str, bytes], config: mc.ModelConfig | None = None
) -> Path:
    """Write a load request's `file:<path>` contents into a new temporary model folder.

    As in Triton, the files replace the repository's folder for this load: nothing is copied from
    `model_dir` (only its name is used). `config`, when given, is written as config.pbtxt. The
    caller removes the returned folder once no version loaded from it is served.
    """
    relatives = {name: _safe_relative(name) for name in files}
    temp = Path(tempfile.mkdtemp(prefix=f"meshserve-{Path(model_dir).name}-"))
    try:
        for name, rel in relatives.items():
            dest = temp.joinpath(*rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(files[name])
        if config is not None:
            (temp / CONFIG_FILENAME).write_text(text_format.MessageToString(config))
    except OSError as err:
        shutil.rmtree(temp, ignore_errors=True)
        raise ModelLoadError(f"cannot write the override files of '{model_dir}': {err}") from err
    return temp


def check_model_name(name: str) -> None:
    """A model name is one folder of the repository: not empty, no path separators."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise InvalidArgument(
            f"'{name}' is not a model name; give the name of a folder of the repository"
        )
