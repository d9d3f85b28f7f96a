"""The embedded registry's instances, saved so that a restarted control plane starts from them.

Data flow: ``Registry`` changes ─▶ the control plane's reconcile loop ─▶ ``save_instances`` (a JSON
file, replaced atomically) … restart … ``load_instances`` ─▶ ``Registry.restore`` (each instance on
a short lease that its own next heartbeat renews) ─▶ the first snapshot, which is the config
Envoy already runs. Without this, a restarted control plane knows no service until each one
re-registers, and would either hand Envoy an empty mesh or have to guess how long to wait.

Format: ``{"instances": [{"id", "family", "host", "grpc_port", "http_port", "metrics_port",
"models": [{"name", "version", "state", "reason", "platform", "stateful"}]}]}`` (``stateful`` may
be missing in older files). A file that cannot be read is logged and ignored: it is a cache of
what the services tell the registry anyway.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from control_plane.files import replace_json
from control_plane.model import ModelVersion, ServiceInstance

log = logging.getLogger(__name__)


def save_instances(path: Path, instances: Iterable[ServiceInstance]) -> None:
    replace_json(path, {"instances": [dataclasses.asdict(i) for i in instances]})


def _instance(raw: dict[str, Any]) -> ServiceInstance:
    models = tuple(ModelVersion(**m) for m in raw.get("models", ()))
    instance = ServiceInstance(**{**raw, "models": models})
    ints = (instance.grpc_port, instance.http_port, instance.metrics_port)
    strs = (instance.id, instance.family, instance.host)
    if not all(isinstance(v, int) for v in ints) or not all(isinstance(v, str) for v in strs):
        raise TypeError(f"instance {raw.get('id')!r} has a field of the wrong type")
    return instance


def load_instances(path: Path) -> tuple[ServiceInstance, ...] | None:
    """The instances saved at ``path``; None when there is no file or it cannot be read."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return tuple(_instance(raw) for raw in data["instances"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error(
            "cannot read the saved registry %s (%s); waiting for services to re-register instead",
            path,
            exc,
        )
        return None
