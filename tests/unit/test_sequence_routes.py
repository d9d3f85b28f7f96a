"""Sequence affinity in the translated resources (control_plane/sequence_affinity.py): a model a
replica reports stateful gets hashing routes (version split included), the filter's script on
its routes, RING_HASH clusters whose endpoints are keyed by instance id; other models are
balanced as before. And the ``stateful`` flag's way there: registry proto, Consul Meta, the
saved registry. Envoy accepting these resources: test_translate_resources.py."""

from __future__ import annotations

import json
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from control_plane.consul import instance_from_entry
from control_plane.registry import instance_from_proto
from control_plane.registry_file import load_instances, save_instances
from control_plane.sequence_affinity import GRPC_SOURCE, HTTP_SOURCE, SEQUENCE_FILTER
from protos.gen.meshserve import registry_pb2 as rpb
from services.core.identity import ServiceIdentity
from services.core.mesh_routes import RouteTable
from services.core.registration import ModelStatus, consul_registration_payload
from tests.unit.translate_support import mesh, resources, route_config, stateful


def _hashes(route: rc.Route) -> bool:
    return [h.header.header_name for h in route.route.hash_policy] == ["meshserve-sequence"]


def _script(route: rc.Route) -> str | None:
    if SEQUENCE_FILTER not in route.typed_per_filter_config:
        return None
    per_route = lua_pb2.LuaPerRoute()
    assert route.typed_per_filter_config[SEQUENCE_FILTER].Unpack(per_route)
    return str(per_route.name)


def test_a_stateful_models_routes_hash_on_the_sequence() -> None:
    res = resources(stateful(mesh(simple={"1": 50, "2": 50}), "simple"))
    for config in ("grpc_routes", "http_routes"):
        routes = route_config(res, config)
        simple = [r for r in routes if "simple" in r.name.split(":") and r.HasField("route")]
        others = [r for r in routes if "simple_string" in r.name.split(":")]
        assert simple and others
        for route in simple:
            if route.route.cluster.startswith("front"):
                continue  # e.g. an unknown version of it: the front answers
            assert _hashes(route), route.name
            assert _script(route) == "sequence", route.name
            if route.route.HasField("weighted_clusters"):
                assert route.route.weighted_clusters.use_hash_policy.value, route.name
        for route in others:
            assert not route.route.hash_policy and _script(route) is None, route.name
    split = [r for r in route_config(res, "grpc_routes") if r.name == "body:model_name:simple"]
    assert split[0].route.weighted_clusters.use_hash_policy.value


def test_nothing_hashes_without_a_stateful_model() -> None:
    res = resources(mesh(simple={"1": 50, "2": 50}))
    for config in ("grpc_routes", "http_routes"):
        for route in route_config(res, config):
            assert not route.route.hash_policy and _script(route) is None, route.name
    assert all(c.lb_policy != cluster_pb2.Cluster.RING_HASH for c in res.clusters)


def test_a_stateful_models_clusters_ring_hash_on_instance_ids() -> None:
    res = resources(stateful(mesh(), "simple"))
    policy = {c.name: c.lb_policy for c in res.clusters}
    assert policy["model:simple:1"] == cluster_pb2.Cluster.RING_HASH
    assert policy["model-http:simple:2"] == cluster_pb2.Cluster.RING_HASH
    assert policy["model:simple_string:1"] == cluster_pb2.Cluster.LEAST_REQUEST
    keys = {}
    for assignment in res.endpoints:
        if assignment.cluster_name in ("model:simple:1", "model-http:simple:1"):
            keys[assignment.cluster_name] = [
                lb.metadata.filter_metadata["envoy.lb"]["hash_key"]
                for lb in assignment.endpoints[0].lb_endpoints
            ]
    # the same key for a service in its gRPC and its REST cluster: one ring for both
    assert keys["model:simple:1"] == keys["model-http:simple:1"] == ["a", "b"]


def test_both_listeners_carry_the_filter_with_their_script() -> None:
    res = resources(mesh())
    sources = {}
    for listener in res.listeners:
        hcm = hcm_pb2.HttpConnectionManager()
        assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
        names = [f.name for f in hcm.http_filters]
        assert names.index(SEQUENCE_FILTER) < names.index("envoy.filters.http.router")
        lua = lua_pb2.Lua()
        assert hcm.http_filters[names.index(SEQUENCE_FILTER)].typed_config.Unpack(lua)
        assert not lua.HasField("default_source_code")  # no script unless a route names it
        sources[listener.name] = lua.source_codes["sequence"].inline_string
    assert sources == {"grpc": GRPC_SOURCE, "http": HTTP_SOURCE}


def test_in_mesh_calls_to_a_stateful_model_go_through_the_gateway() -> None:
    res = resources(stateful(mesh(), "simple"))
    (grpc_routes,) = [r for r in res.routes if r.name == "grpc_routes"]
    table = RouteTable(grpc_routes, {"model:simple:1": ("127.0.0.1:9000",)})
    headers = {"meshserve-model": "simple", "meshserve-version": "1"}
    assert table.route("/inference.GRPCInferenceService/ModelInfer", headers) is None
    plain = resources(mesh())
    (grpc_routes,) = [r for r in plain.routes if r.name == "grpc_routes"]
    table = RouteTable(grpc_routes, {"model:simple:1": ("127.0.0.1:9000",)})
    assert table.route("/inference.GRPCInferenceService/ModelInfer", headers) is not None


def test_the_flag_travels_through_registry_consul_and_the_saved_registry(tmp_path: Path) -> None:
    msg = rpb.ServiceInstance(
        id="onnx-1",
        family="onnx",
        host="127.0.0.1",
        grpc_port=9001,
        models=[
            rpb.ModelVersion(name="seq", version="1", state="READY", stateful=True),
            rpb.ModelVersion(name="simple", version="1", state="READY"),
        ],
    )
    inst = instance_from_proto(msg)
    assert [(m.name, m.stateful) for m in inst.models] == [("seq", True), ("simple", False)]

    identity = ServiceIdentity("onnx-1", "onnx", "127.0.0.1", 9001, 9000, 9002)
    payload = consul_registration_payload(
        identity,
        [ModelStatus("seq", "1", "READY", stateful=True), ModelStatus("simple", "1", "READY")],
    )
    service = {k: payload[k] for k in ("ID", "Address", "Port", "Meta")}
    from_consul = instance_from_entry({"Service": service})
    assert [(m.name, m.stateful) for m in from_consul.models] == [("seq", True), ("simple", False)]

    path = tmp_path / "registry.json"
    save_instances(path, [inst])
    assert load_instances(path) == (inst,)
    # a file saved before the flag existed still loads (not stateful)
    doc = json.loads(path.read_text())
    for model in doc["instances"][0]["models"]:
        del model["stateful"]
    path.write_text(json.dumps(doc))
    (old,) = load_instances(path) or ()
    assert [m.stateful for m in old.models] == [False, False]
