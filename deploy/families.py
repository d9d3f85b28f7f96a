"""Which framework families' services a model repository needs: each model's family from its
config's platform or backend, else from the model file its versions hold."""

from __future__ import annotations

import logging
from pathlib import Path

from services.core.config import load_config_file
from services.core.repository import scan_repository

log = logging.getLogger(__name__)

#: Triton platform/backend names → our framework families (services/<family>)
FAMILY_OF = {
    "onnxruntime_onnx": "onnx",
    "onnxruntime": "onnx",
    "pytorch_libtorch": "torch",
    "pytorch": "torch",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow": "tensorflow",
    "tensorrt_plan": "tensorrt",
    "tensorrt": "tensorrt",
    "python": "python",
    "ensemble": "ensemble",
}
#: model files that identify a family when a model has no config
FILE_FAMILY = {
    "model.onnx": "onnx",
    "model.pt": "torch",
    "model.savedmodel": "tensorflow",
    "model.graphdef": "tensorflow",
    "model.plan": "tensorrt",
    "model.py": "python",
}


def families_in(repository: Path) -> dict[str, list[str]]:
    """Family → model names, from each model's config (platform/backend) or its files."""
    found: dict[str, list[str]] = {}
    for name, model in sorted(scan_repository(repository).items()):
        family = ""
        cfg = model.path / "config.pbtxt"
        if cfg.exists():
            try:
                config = load_config_file(cfg)
                family = FAMILY_OF.get(config.platform) or FAMILY_OF.get(config.backend, "")
            except Exception as exc:
                log.warning("model %r: %s", name, exc)
        if not family:
            files = {p.name for v in model.versions.values() for p in v.iterdir()}
            family = next((f for fn, f in FILE_FAMILY.items() if fn in files), "")
        if family:
            found.setdefault(family, []).append(name)
        else:
            log.warning("model %r: cannot tell its framework family; skipped", name)
    return found
