"""Traffic policy: per-model weights over versions, kept across control-plane restarts.

The front's policy API and the ``meshserve split`` CLI write here; every change produces a new
MeshState and so a new xDS snapshot (weighted clusters). Stored as one JSON file, replaced
atomically, so a crash never leaves half a policy behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from control_plane.model import TrafficPolicy

log = logging.getLogger(__name__)


#: Envoy's weighted clusters take uint32 weights whose sum must fit in a uint32
MAX_TOTAL_WEIGHT = 2**32 - 1


class PolicyError(ValueError):
    """A policy that cannot be applied; the message says what to fix."""


def parse_weights(model: str, weights: Mapping[str, object]) -> dict[str, int]:
    """Validate ``{"1": 90, "2": 10}``: numeric versions, non-negative integer weights, sum > 0."""
    if not weights:
        raise PolicyError(f"split for model '{model}' names no version; give e.g. 1=90 2=10")
    out: dict[str, int] = {}
    for version, weight in weights.items():
        if not str(version).isdigit() or int(str(version)) < 1:
            raise PolicyError(
                f"split for model '{model}': version '{version}' is not a positive integer"
            )
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise PolicyError(
                f"split for model '{model}': weight of version {version} must be an integer >= 0, "
                f"got {weight!r}"
            )
        out[str(int(str(version)))] = weight
    total = sum(out.values())
    if total <= 0:
        raise PolicyError(f"split for model '{model}': weights add up to 0; give at least one > 0")
    if total > MAX_TOTAL_WEIGHT:
        raise PolicyError(
            f"split for model '{model}': weights add up to {total}, more than Envoy accepts "
            f"({MAX_TOTAL_WEIGHT}); use small numbers such as percentages"
        )
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


class PolicyStore:
    """Traffic policies in memory, mirrored to ``path`` (None = memory only)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._policies: dict[str, TrafficPolicy] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            for model, weights in dict(data.get("splits", {})).items():
                self._policies[model] = TrafficPolicy(
                    model, MappingProxyType(parse_weights(model, weights))
                )
        except (OSError, ValueError, AttributeError) as exc:
            raise PolicyError(f"cannot read traffic policies from {path}: {exc}") from exc
        log.info("loaded traffic policies for %d model(s) from %s", len(self._policies), path)

    def all(self) -> Mapping[str, TrafficPolicy]:
        return MappingProxyType(dict(self._policies))

    def set_split(self, model: str, weights: Mapping[str, object]) -> TrafficPolicy:
        policy = TrafficPolicy(model, MappingProxyType(parse_weights(model, weights)))
        self._policies[model] = policy
        self._save()
        return policy

    def clear_split(self, model: str) -> None:
        if self._policies.pop(model, None) is not None:
            self._save()

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        body = {"splits": {m: dict(p.weights) for m, p in sorted(self._policies.items())}}
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".policies-")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2, sort_keys=True)
        Path(tmp).replace(self._path)
