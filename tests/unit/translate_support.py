"""Shared by the control_plane.translate tests (test_translate_resources.py,
test_translate_routes.py) and test_tracing.py: a small mesh state, its translated resources, the
routes of one route configuration, a mirror added to a policy, and the resources as a static
Envoy bootstrap (for ``envoy --mode validate``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format

from control_plane.model import (
    Address,
    MeshState,
    Mirror,
    ModelVersion,
    ServiceInstance,
    TrafficPolicy,
)
from control_plane.translate import Resources, translate

ENVOY = Path(sys.executable).parent / "envoy"


def ready(name: str, version: str) -> ModelVersion:
    return ModelVersion(name, version, "READY")


def instance(id_: str, port: int, *models: ModelVersion) -> ServiceInstance:
    return ServiceInstance(id_, "onnx", "127.0.0.1", port, port + 1, models=models)


def mesh(**policies: dict[str, int]) -> MeshState:
    return MeshState(
        instances=(
            instance("b", 9100, ready("simple", "1"), ready("simple", "2"), ready("a.b+c", "3")),
            instance(
                "a",
                9000,
                ready("simple", "1"),
                ModelVersion("simple", "3", "UNAVAILABLE", "loading"),
                ready("simple_string", "1"),
            ),
        ),
        policies={m: TrafficPolicy(m, w) for m, w in policies.items()},
        front_grpc=Address("127.0.0.1", 7000),
        front_http=Address("127.0.0.1", 7001),
    )


def resources(state: MeshState) -> Resources:
    return translate(state, grpc_port=8001, http_port=8000)


def route_config(res: Resources, name: str) -> list[rc.Route]:
    (config,) = [r for r in res.routes if r.name == name]
    return list(config.virtual_hosts[0].routes)


def serialized(res: Resources) -> list[bytes]:
    messages = [*res.listeners, *res.routes, *res.clusters, *res.endpoints]
    return [m.SerializeToString(deterministic=True) for m in messages]


def mirrored(state: MeshState, version: str, percent: float) -> MeshState:
    """``state`` with ``simple`` mirrored to ``version`` (its split, if any, kept)."""
    split = state.policies.get("simple")
    weights = split.weights if split is not None else {}
    policy = TrafficPolicy("simple", weights, Mirror(version, percent))
    return replace(state, policies={**state.policies, "simple": policy})


def stateful(state: MeshState, model: str) -> MeshState:
    """``state`` with every version of ``model`` reported stateful (sequence-batched)."""
    instances = tuple(
        replace(i, models=tuple(replace(m, stateful=m.name == model) for m in i.models))
        for i in state.instances
    )
    return replace(state, instances=instances)


def _static_secrets(listener: listener_pb2.Listener) -> None:
    """Make the listener's TLS name static secrets instead of ones sent over ADS."""
    for chain in listener.filter_chains:
        if not chain.HasField("transport_socket"):
            continue
        context = tls_pb2.DownstreamTlsContext()
        assert chain.transport_socket.typed_config.Unpack(context)
        common = context.common_tls_context
        for config in common.tls_certificate_sds_secret_configs:
            config.ClearField("sds_config")
        if common.HasField("validation_context_sds_secret_config"):
            common.validation_context_sds_secret_config.ClearField("sds_config")
        chain.transport_socket.typed_config.Pack(context, deterministic=True)


def static_bootstrap(res: Resources) -> dict[str, object]:
    """The resources as a static bootstrap: RDS inlined, EDS clusters made STATIC, secrets
    static."""
    routes = {r.name: r for r in res.routes}
    assignments = {e.cluster_name: e for e in res.endpoints}
    boot = bootstrap_pb2.Bootstrap()
    boot.static_resources.secrets.extend(res.secrets)
    for listener in res.listeners:
        static = boot.static_resources.listeners.add()
        static.CopyFrom(listener)
        _static_secrets(static)
        network_filter = static.filter_chains[0].filters[0]
        hcm = hcm_pb2.HttpConnectionManager()
        assert network_filter.typed_config.Unpack(hcm)
        hcm.route_config.CopyFrom(routes[hcm.rds.route_config_name])  # replaces the rds oneof
        network_filter.typed_config.Pack(hcm, deterministic=True)
    for cluster in res.clusters:
        static_cluster = boot.static_resources.clusters.add()
        static_cluster.CopyFrom(cluster)
        if cluster.type == cluster_pb2.Cluster.EDS:
            static_cluster.ClearField("eds_cluster_config")
            static_cluster.type = cluster_pb2.Cluster.STATIC
            static_cluster.load_assignment.CopyFrom(assignments[cluster.name])
    return json_format.MessageToDict(boot)


def assert_envoy_accepts(res: Resources, folder: Path) -> None:
    """Envoy's own ``--mode validate`` passes on the resources as a static bootstrap (files the
    config names, such as certificates, are read too)."""
    config = folder / "bootstrap.json"
    config.write_text(json.dumps(static_bootstrap(res)))
    done = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
