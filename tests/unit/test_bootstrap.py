"""The gateway's bootstrap parses as Envoy's v3 Bootstrap and names only admin and ADS."""

from __future__ import annotations

from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from gateway.bootstrap import bootstrap


def test_bootstrap_is_a_valid_v3_bootstrap_with_only_the_ads_cluster() -> None:
    config = bootstrap("127.0.0.1", 18000, 19901, node_id="gw-1")
    parsed = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(config, parsed)  # raises on any unknown field or wrong type
    assert parsed.node.id == "gw-1"
    assert parsed.node.cluster == "meshserve"
    assert parsed.admin.address.socket_address.port_value == 19901
    assert parsed.admin.address.socket_address.address == "127.0.0.1"
    assert [c.name for c in parsed.static_resources.clusters] == ["xds"]
    assert not parsed.static_resources.listeners
    xds = parsed.static_resources.clusters[0]
    assert xds.type == xds.STATIC
    endpoint = xds.load_assignment.endpoints[0].lb_endpoints[0].endpoint
    assert endpoint.address.socket_address.port_value == 18000
    ads = parsed.dynamic_resources.ads_config
    assert ads.api_type == ads.GRPC
    assert ads.grpc_services[0].envoy_grpc.cluster_name == "xds"
    assert parsed.dynamic_resources.cds_config.HasField("ads")
    assert parsed.dynamic_resources.lds_config.HasField("ads")


def test_a_host_name_is_resolved_by_envoy() -> None:
    parsed = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(bootstrap("control-plane", 18000, 0), parsed)
    xds = parsed.static_resources.clusters[0]
    assert xds.type == xds.STRICT_DNS
