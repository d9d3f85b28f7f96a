"""Small JSON files the control plane keeps across restarts (traffic policies, the registry)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def replace_json(path: Path, body: object) -> None:
    """Write ``body`` as JSON to ``path`` atomically (a temporary file renamed over it), so a
    crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2, sort_keys=True)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
