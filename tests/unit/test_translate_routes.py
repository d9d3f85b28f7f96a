"""control_plane.translate: the gRPC and REST routes Envoy gets from the mesh state (version
splits, the default version, route order, the body-extraction matches, paths, mirrors).
The resources as a whole and Envoy's validation of them: test_translate_resources.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.v3 import percent_pb2

from control_plane.filters import EXTRACTED_FIELDS
from control_plane.routes import EXTRACTION_FILTER, re2_escape
from control_plane.snapshot import InconsistentSnapshot, check_consistency, make_snapshot
from control_plane.translate import Resources, version_key
from tests.unit.translate_support import (
    mesh,
    mirrored,
    resources,
    route_config,
    serialized,
)


def default_route(res: Resources, model: str) -> rc.Route:
    (route,) = [r for r in route_config(res, "grpc_routes") if r.name == f"body:model_name:{model}"]
    return route


def version_header(header_options: Sequence[base_pb2.HeaderValueOption]) -> str:
    (option,) = header_options
    assert option.header.key == "meshserve-version"
    return str(option.header.value)


def test_weighted_split_over_ready_versions_only() -> None:
    route = default_route(resources(mesh(simple={"1": 90, "2": 10, "3": 5})), "simple")
    clusters = route.route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in clusters] == [
        ("model:simple:1", 90),
        ("model:simple:2", 10),
    ]
    assert [version_header(c.request_headers_to_add) for c in clusters] == ["1", "2"]


def test_split_with_no_ready_weighted_version_falls_back_to_highest() -> None:
    route = default_route(resources(mesh(simple={"3": 100})), "simple")
    assert route.route.cluster == "model:simple:2"
    assert version_header(route.request_headers_to_add) == "2"


def test_default_without_policy_is_highest_ready_numerically() -> None:
    assert max(["9", "10", "2"], key=version_key) == "10"
    assert default_route(resources(mesh()), "simple").route.cluster == "model:simple:2"


def test_grpc_route_order_headers_then_body_then_front() -> None:
    routes = route_config(resources(mesh()), "grpc_routes")
    kinds = [r.name.split(":")[0] for r in routes]
    last_header = max(i for i, k in enumerate(kinds) if k == "hdr")
    first_body = kinds.index("body")
    assert last_header < kinds.index("compressed") < first_body
    assert routes[-1].name == "front" and routes[-1].route.cluster == "front"
    assert not routes[-1].match.headers and not routes[-1].match.dynamic_metadata
    # per model, version-specific body routes before the version-less one
    body = [r.name for r in routes if r.name.split(":")[:3] == ["body", "model_name", "simple"]]
    assert body == [
        "body:model_name:simple:1",
        "body:model_name:simple:2",
        "body:model_name:simple",
    ]


def test_header_and_compressed_routes_skip_the_body_filters() -> None:
    for route in route_config(resources(mesh()), "grpc_routes"):
        if route.name.startswith(("hdr", "compressed")):
            assert {EXTRACTION_FILTER, "envoy.filters.http.lua"} <= set(
                route.typed_per_filter_config
            )
        else:
            assert not route.typed_per_filter_config


def test_body_routes_match_the_extracted_fields() -> None:
    routes = {r.name: r for r in route_config(resources(mesh()), "grpc_routes")}
    name_match, version_match = routes["body:name:simple:2"].match.dynamic_metadata
    assert name_match.filter == EXTRACTION_FILTER
    assert name_match.path[0].key == "name"
    assert name_match.value.list_match.one_of.string_match.exact == "simple"
    assert version_match.path[0].key == "version" and not version_match.invert
    _, no_version = routes["body:model_name:simple"].match.dynamic_metadata
    assert no_version.path[0].key == "model_version" and no_version.invert
    assert {f for fields in EXTRACTED_FIELDS.values() for f in fields} == {
        "model_name",
        "model_version",
        "name",
        "version",
    }


def http_target(res: Resources, path: str) -> str:
    """The cluster (or weighted clusters) the first matching REST route picks for ``path``."""
    for route in route_config(res, "http_routes"):
        m = route.match
        if m.HasField("safe_regex"):
            hit = re.fullmatch(m.safe_regex.regex, path) is not None
        elif m.path:
            hit = path == m.path
        else:
            hit = path.startswith(m.prefix)
        if hit:
            weighted = route.route.weighted_clusters.clusters
            return ",".join(c.name for c in weighted) or route.route.cluster
    raise AssertionError(f"no route for {path}")


@pytest.mark.parametrize(
    ("path", "cluster"),
    [
        ("/v2/models/simple", "model-http:simple:2"),
        ("/v2/models/simple/infer", "model-http:simple:2"),
        ("/v2/models/simple/trace/setting", "front-http"),
        ("/v2/models/simple/versions/1/infer", "model-http:simple:1"),
        ("/v2/models/simple/versions/3/infer", "front-http"),  # not READY: no fallthrough
        ("/v2/models/simple_string/infer", "model-http:simple_string:1"),
        ("/v2/models/simplex", "front-http"),
        ("/v2/models/stats", "front-http"),
        ("/v2/health/ready", "front-http"),
        ("/v2/repository/index", "front-http"),
        ("/v2/models/a.b+c/ready", "model-http:a.b+c:3"),
        ("/v2/models/a.b%2Bc/ready", "model-http:a.b+c:3"),
        ("/v2/models/aXb+c/ready", "front-http"),  # "." is literal
        ("/v2/models/a.bbc/ready", "front-http"),  # "+" is literal
    ],
)
def test_rest_routes_by_path(path: str, cluster: str) -> None:
    assert http_target(resources(mesh()), path) == cluster


def test_rest_default_is_weighted_like_grpc() -> None:
    res = resources(mesh(simple={"1": 50, "2": 50}))
    assert http_target(res, "/v2/models/simple/infer") == "model-http:simple:1,model-http:simple:2"


def mirrors(route: rc.Route) -> list[tuple[str, int, str]]:
    """(cluster, parts per million, meshserve-version written over the copy) per mirror policy."""
    out = []
    for policy in route.route.request_mirror_policies:
        fraction = policy.runtime_fraction.default_value
        assert fraction.denominator == percent_pb2.FractionalPercent.MILLION
        (mutation,) = policy.request_headers_mutations
        assert (
            mutation.append.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        )
        out.append((policy.cluster, fraction.numerator, version_header([mutation.append])))
    return out


def test_mirror_on_the_version_less_inference_routes_only() -> None:
    res = resources(mirrored(mesh(simple={"1": 90, "2": 10}), "2", 12.5))
    grpc = {r.name: r for r in route_config(res, "grpc_routes")}
    assert {n for n, r in grpc.items() if r.route.request_mirror_policies} == {
        "hdr:simple:infer",
        "body:model_name:simple",
    }
    for name in ("hdr:simple:infer", "body:model_name:simple"):
        assert mirrors(grpc[name]) == [("model:simple:2", 125_000, "2")]
        weighted = grpc[name].route.weighted_clusters.clusters
        assert [c.name for c in weighted] == ["model:simple:1", "model:simple:2"]  # split kept

    # hdr:simple:infer narrows hdr:simple (same headers, body filters off) to the inference RPCs
    names = list(grpc)
    assert names.index("hdr:simple:infer") + 1 == names.index("hdr:simple")
    infer, plain = grpc["hdr:simple:infer"], grpc["hdr:simple"]
    assert list(infer.match.headers) == list(plain.match.headers)
    assert set(infer.typed_per_filter_config) == set(plain.typed_per_filter_config) != set()
    for rpc, hit in (("ModelInfer", True), ("ModelStreamInfer", True), ("ModelMetadata", False)):
        path = f"/inference.GRPCInferenceService/{rpc}"
        assert (re.fullmatch(infer.match.safe_regex.regex, path) is not None) == hit

    http = {r.name: r for r in route_config(res, "http_routes")}
    assert {n for n, r in http.items() if r.route.request_mirror_policies} == {"path:simple:infer"}
    assert mirrors(http["path:simple:infer"]) == [("model-http:simple:2", 125_000, "2")]
    both = "model-http:simple:1,model-http:simple:2"
    assert http_target(res, "/v2/models/simple/infer") == both
    assert http_target(res, "/v2/models/simple/versions/2/infer") == "model-http:simple:2"
    check_consistency(make_snapshot(res))


def test_mirror_without_a_split_copies_the_highest_versions_requests() -> None:
    route = default_route(resources(mirrored(mesh(), "1", 100)), "simple")
    assert route.route.cluster == "model:simple:2"
    assert version_header(route.request_headers_to_add) == "2"
    assert mirrors(route) == [("model:simple:1", 1_000_000, "1")]


def test_no_mirror_while_the_shadow_is_not_ready() -> None:
    for state in (mesh(), mesh(simple={"1": 90, "2": 10})):
        res = resources(mirrored(state, "3", 50))  # version 3 is still loading
        assert serialized(res) == serialized(resources(state))
        check_consistency(make_snapshot(res))


def test_a_mirror_to_a_missing_cluster_is_inconsistent() -> None:
    res = resources(mirrored(mesh(), "1", 10))
    (config,) = [r for r in res.routes if r.name == "grpc_routes"]
    for route in config.virtual_hosts[0].routes:
        for policy in route.route.request_mirror_policies:
            policy.cluster = "model:simple:9"
    with pytest.raises(InconsistentSnapshot, match=r"model:simple:9"):
        check_consistency(make_snapshot(res))


def test_re2_escape_leaves_ordinary_characters() -> None:
    assert re2_escape("a-b_c.d+e(f)") == r"a-b_c\.d\+e\(f\)"
