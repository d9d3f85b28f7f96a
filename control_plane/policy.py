"""Traffic policy: per-model weights over versions and mirrors, kept across restarts.

The front's policy API and the ``meshserve split`` / ``meshserve mirror`` CLI write here; every
change produces a new MeshState and so a new xDS snapshot (weighted clusters, mirror policies).
Stored as one JSON file, ``{"splits": {model: {version: weight}}, "mirrors": {model: {"version":
"2", "percent": 10.0}}}`` (files from before mirrors, with "splits" only, load as they are),
replaced atomically, so a crash never leaves half a policy behind.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from control_plane.files import replace_json
from control_plane.model import Mirror, TrafficPolicy

log = logging.getLogger(__name__)


#: Envoy's weighted clusters take uint32 weights whose sum must fit in a uint32
MAX_TOTAL_WEIGHT = 2**32 - 1
#: Envoy's finest fraction is one in a million (FractionalPercent, denominator MILLION)
MIN_MIRROR_PERCENT = 0.0001


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


def parse_mirror(model: str, version: object, percent: object) -> Mirror:
    """Validate a mirror: ``version`` a positive integer (or its digits), ``percent`` a number in
    (0, 100], fractions allowed down to ``MIN_MIRROR_PERCENT``."""
    digits = "" if isinstance(version, bool) else str(version)
    if not (digits.isascii() and digits.isdigit()) or int(digits) < 1:
        raise PolicyError(
            f"mirror for model '{model}': version {version!r} is not a positive integer"
        )
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise PolicyError(f"mirror for model '{model}': percent must be a number, got {percent!r}")
    if not math.isfinite(percent) or not 0 < percent <= 100:
        raise PolicyError(
            f"mirror for model '{model}': percent must be in (0, 100], got {percent!r}"
        )
    if percent < MIN_MIRROR_PERCENT:
        raise PolicyError(
            f"mirror for model '{model}': percent {percent!r} is below {MIN_MIRROR_PERCENT}, "
            "the finest share Envoy mirrors"
        )
    return Mirror(version=str(int(digits)), percent=float(percent))


class PolicyStore:
    """Traffic policies in memory, saved to ``path`` after every change (None = memory only)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._policies: dict[str, TrafficPolicy] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            for model, weights in dict(data.get("splits", {})).items():
                weighted = MappingProxyType(parse_weights(model, weights))
                self._put(replace(self._get(model), weights=weighted))
            for model, mirror in dict(data.get("mirrors", {})).items():
                shadow = parse_mirror(model, mirror.get("version"), mirror.get("percent"))
                self._put(replace(self._get(model), mirror=shadow))
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise PolicyError(f"cannot read traffic policies from {path}: {exc}") from exc
        log.info("loaded traffic policies for %d model(s) from %s", len(self._policies), path)

    def all(self) -> Mapping[str, TrafficPolicy]:
        return MappingProxyType(dict(self._policies))

    def set_split(self, model: str, weights: Mapping[str, object]) -> TrafficPolicy:
        weighted = MappingProxyType(parse_weights(model, weights))
        return self._change(replace(self._get(model), weights=weighted))

    def clear_split(self, model: str) -> None:
        if model in self._policies:
            self._change(replace(self._get(model), weights=MappingProxyType({})))

    def set_mirror(self, model: str, version: object, percent: object) -> Mirror:
        """Mirror ``percent`` % of ``model``'s version-less requests to ``version``."""
        mirror = parse_mirror(model, version, percent)
        self._change(replace(self._get(model), mirror=mirror))
        return mirror

    def clear_mirror(self, model: str) -> None:
        if model in self._policies:
            self._change(replace(self._get(model), mirror=None))

    def _get(self, model: str) -> TrafficPolicy:
        return self._policies.get(model, TrafficPolicy(model, MappingProxyType({})))

    def _put(self, policy: TrafficPolicy) -> None:
        """Keep ``policy``, or forget the model when it has neither split nor mirror left."""
        if policy.weights or policy.mirror is not None:
            self._policies[policy.model] = policy
        else:
            self._policies.pop(policy.model, None)

    def _change(self, policy: TrafficPolicy) -> TrafficPolicy:
        self._put(policy)
        self._save()
        return policy

    def _save(self) -> None:
        if self._path is None:
            return
        policies = sorted(self._policies.items())
        body = {
            "splits": {m: dict(p.weights) for m, p in policies if p.weights},
            "mirrors": {
                m: {"version": p.mirror.version, "percent": p.mirror.percent}
                for m, p in policies
                if p.mirror is not None
            },
        }
        replace_json(self._path, body)
