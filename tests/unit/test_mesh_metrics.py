"""Merging several services' Prometheus texts into one valid exposition."""

from __future__ import annotations

from deploy.mesh_metrics import merge_exposition

A = """# HELP nv_inference_count Number of inferences
# TYPE nv_inference_count counter
nv_inference_count{model="simple",version="1"} 3
"""
B = """# HELP nv_inference_count Number of inferences
# TYPE nv_inference_count counter
nv_inference_count{model="simple",version="1"} 5
# HELP nv_inference_batch_size Batch sizes
# TYPE nv_inference_batch_size histogram
nv_inference_batch_size_bucket{le="1.0",model="simple",version="1"} 2.0
nv_inference_batch_size_count{model="simple",version="1"} 2.0
"""
ENVOY = """# TYPE envoy_cluster_upstream_rq_total counter
envoy_cluster_upstream_rq_total{envoy_cluster_name="model_simple_1"} 8
"""


def test_families_merge_once_and_samples_name_their_service() -> None:
    text = merge_exposition([("onnx-a", A), ("onnx-b", B), ("", ENVOY)])
    lines = text.splitlines()
    assert lines.count("# TYPE nv_inference_count counter") == 1
    assert 'nv_inference_count{service="onnx-a",model="simple",version="1"} 3' in lines
    assert 'nv_inference_count{service="onnx-b",model="simple",version="1"} 5' in lines
    assert (
        'nv_inference_batch_size_bucket{service="onnx-b",le="1.0",model="simple",version="1"} 2.0'
        in lines
    )
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="model_simple_1"} 8' in lines
    # samples follow their own family's header
    assert lines.index("# TYPE nv_inference_batch_size histogram") < lines.index(
        'nv_inference_batch_size_count{service="onnx-b",model="simple",version="1"} 2.0'
    )
