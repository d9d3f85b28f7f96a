"""The control plane's view of the mesh as plain, immutable data.

Sources (embedded registry, Consul) produce ``ServiceInstance`` records; the traffic policy store
produces ``TrafficPolicy`` records; ``MeshState`` bundles both with where the control plane's front
listens. ``translate`` turns one MeshState into Envoy resources, purely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

READY = "READY"


@dataclass(frozen=True, slots=True)
class ModelVersion:
    name: str
    version: str
    state: str
    reason: str = ""
    platform: str = ""
    #: sequence-batched: every request of one sequence must reach the same replica and version
    stateful: bool = False


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One framework service process and what it serves."""

    id: str
    family: str
    host: str
    grpc_port: int
    http_port: int
    metrics_port: int = 0
    models: tuple[ModelVersion, ...] = ()

    def ready_versions(self) -> list[ModelVersion]:
        return [m for m in self.models if m.state == READY]


@dataclass(frozen=True, slots=True)
class Mirror:
    """Copy ``percent`` % (0 < p <= 100) of a model's version-less requests to ``version``, the
    shadow; the shadow's answers are thrown away by the gateway."""

    version: str
    percent: float


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """A model's traffic policy for requests that name no version: weights over versions, e.g.
    {"1": 90, "2": 10} (empty: the highest READY version), and an optional mirror."""

    model: str
    weights: Mapping[str, int] = field(default_factory=dict)
    mirror: Mirror | None = None


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class MeshState:
    """Everything translation needs; equal states translate to identical resources."""

    instances: tuple[ServiceInstance, ...] = ()
    policies: Mapping[str, TrafficPolicy] = field(default_factory=dict)
    #: the control plane's front (server-level RPCs, unknown models), gRPC and HTTP
    front_grpc: Address | None = None
    front_http: Address | None = None


def cluster_name(model: str, version: str) -> str:
    """The Envoy cluster of one model version: ``model:<name>:<version>``."""
    return f"model:{model}:{version}"


def http_cluster_name(model: str, version: str) -> str:
    """The HTTP/REST twin of a model version's cluster (services serve REST on another port)."""
    return f"model-http:{model}:{version}"
