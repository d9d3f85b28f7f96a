"""The states a model and its versions go through, as the manager records them.

LOADING ─▶ READY ─▶ UNLOADING ─▶ UNAVAILABLE (unloaded), or LOADING ─▶ UNAVAILABLE (failed, with
the reason). RepositoryIndex reports these states and reasons.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protos.gen.inference import model_config_pb2 as mc

if TYPE_CHECKING:
    from services.core.model import ServedModel


#: the reason of a model unloaded on request (RepositoryModelUnload), which strict readiness
#: does not count against the server
UNLOADED = "unloaded"


class ModelState(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(slots=True)
class VersionEntry:
    version: int
    state: ModelState
    reason: str = ""
    served: ServedModel | None = None
    fingerprint: object = None


@dataclass(slots=True)
class ModelEntry:
    name: str
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = ""
    config: mc.ModelConfig | None = None
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    fingerprint: object = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def strictly_ready(self) -> bool:
        """Triton's strict readiness of one model: it has versions, each READY or unloaded on
        request (or the model itself was unloaded on request)."""
        if self.reason == UNLOADED:
            return True
        return bool(self.versions) and all(
            v.state is ModelState.READY or v.reason == UNLOADED for v in self.versions.values()
        )


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str
