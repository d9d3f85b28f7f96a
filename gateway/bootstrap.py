"""The Envoy bootstrap: who the gateway is, its loopback admin port, and where its ADS server is.

Everything else (listeners, routes, clusters, endpoints) arrives over ADS from the control plane
(``control_plane.ads``), so the bootstrap names exactly one static cluster, ``xds``: the control
plane's gRPC address over HTTP/2. ``gateway.launcher`` writes this dict as JSON and starts Envoy.
"""

from __future__ import annotations

import ipaddress
from typing import Any

ADS_CLUSTER = "xds"


def bootstrap(
    ads_host: str,
    ads_port: int,
    admin_port: int,
    node_id: str = "meshserve-gateway",
    cluster: str = "meshserve",
) -> dict[str, Any]:
    """An Envoy v3 bootstrap (JSON-ready) that takes all its resources from ADS.

    The ``xds`` cluster is STATIC for an IP address; a host name is resolved by Envoy
    (STRICT_DNS), since a STATIC cluster accepts IP addresses only.
    """
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": ADS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": ADS_CLUSTER,
                    "type": "STATIC" if is_ip(ads_host) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": ADS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": ads_host,
                                                    "port_value": ads_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP address (Envoy takes those as STATIC endpoints)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
