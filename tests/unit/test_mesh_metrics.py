"""Merging several services' Prometheus texts into one valid exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

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


PYTHON_A = """# HELP nv_inference_count Number of inferences
# TYPE nv_inference_count counter
nv_inference_count{model="pre",version="1"} 2
# HELP preprocess_latency_ns Cumulative time spent pre-processing requests
# TYPE preprocess_latency_ns counter
preprocess_latency_ns{model="pre",service="tenant-a",version="1"} 2023
# HELP image_bytes Sizes of the images received
# TYPE image_bytes histogram
image_bytes_count{model="pre"} 2
image_bytes_sum{model="pre"} 1500
image_bytes_bucket{model="pre",le="1024"} 1
image_bytes_bucket{model="pre",le="+Inf"} 2
"""
PYTHON_B = """# HELP preprocess_latency_ns Another description of the same name
# TYPE preprocess_latency_ns counter
preprocess_latency_ns{model="pre",version="1"} 7
# HELP image_bytes Sizes, as a gauge here
# TYPE image_bytes gauge
image_bytes{model="pre"} 3
"""


def test_custom_families_pass_through_and_stay_valid() -> None:
    text = merge_exposition([("python-a", PYTHON_A), ("python-b", PYTHON_B)])
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses: valid
    assert families["preprocess_latency_ns"].type == "counter"
    lines = text.splitlines()
    # one HELP per family: the first one seen
    assert [line for line in lines if line.startswith("# HELP preprocess_latency_ns")] == [
        "# HELP preprocess_latency_ns Cumulative time spent pre-processing requests"
    ]
    # a label named like ours is kept, as exported_service
    assert (
        'preprocess_latency_ns{service="python-a",model="pre",exported_service="tenant-a",'
        'version="1"} 2023'
    ) in lines
    assert 'preprocess_latency_ns{service="python-b",model="pre",version="1"} 7' in lines
    assert 'image_bytes_bucket{service="python-a",model="pre",le="1024"} 1' in lines
    assert 'image_bytes_sum{service="python-a",model="pre"} 1500' in lines
    # python-b's image_bytes is a gauge: one family has one TYPE, so its samples are left out
    assert lines.count("# TYPE image_bytes histogram") == 1
    assert "# TYPE image_bytes gauge" not in lines
    assert not any(line.startswith('image_bytes{service="python-b"') for line in lines)
