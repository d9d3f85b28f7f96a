"""Prometheus exposition: Triton's names, labels and types; batch-size histogram; /metrics app."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.core.metrics import (
    CONTENT_TYPE,
    ModelMetricsSource,
    TritonMetricsCollector,
    batch_size_buckets,
    render_text,
    start_metrics_server,
)
from services.core.statistics import ModelStats

TRITON_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


def _busy_stats() -> ModelStats:
    stats = ModelStats()
    for _ in range(3):
        stats.record_request_success(
            request_ns=2_000_000,
            queue_ns=500_000,
            compute_input_ns=10_000,
            compute_infer_ns=1_000_000,
            compute_output_ns=20_000,
        )
    stats.record_request_failure(request_ns=1000, reason="REJECTED")
    stats.record_request_failure(request_ns=1000, reason="REJECTED")
    stats.record_request_failure(request_ns=1000, reason="BACKEND")
    for size in (1, 3, 3, 8):
        stats.record_execution(
            batch_size=size,
            inference_count=size,
            compute_input_ns=1,
            compute_infer_ns=1,
            compute_output_ns=1,
        )
    return stats


def _registry(*sources: ModelMetricsSource) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TritonMetricsCollector(lambda: list(sources)))
    return registry


def _lines(text: bytes) -> list[str]:
    return text.decode().splitlines()


def test_counters_use_tritons_names_types_and_labels() -> None:
    text = render_text(_registry(ModelMetricsSource("resnet", "1", _busy_stats(), 5)))
    lines = _lines(text)
    for name in TRITON_COUNTERS:
        assert f"# TYPE {name} counter" in lines
        assert not any(line.startswith(f"{name}_total") for line in lines)
    assert (
        "# HELP nv_inference_request_success Number of successful inference requests, "
        "all batch sizes" in lines
    )
    assert 'nv_inference_request_success{model="resnet",version="1"} 3' in lines
    assert 'nv_inference_count{model="resnet",version="1"} 15' in lines
    assert 'nv_inference_exec_count{model="resnet",version="1"} 4' in lines
    assert 'nv_inference_request_duration_us{model="resnet",version="1"} 6000' in lines
    assert 'nv_inference_queue_duration_us{model="resnet",version="1"} 1500' in lines
    assert 'nv_inference_compute_input_duration_us{model="resnet",version="1"} 30' in lines
    assert 'nv_inference_compute_infer_duration_us{model="resnet",version="1"} 3000' in lines
    assert 'nv_inference_compute_output_duration_us{model="resnet",version="1"} 60' in lines
    assert "# TYPE nv_inference_pending_request_count gauge" in lines
    assert 'nv_inference_pending_request_count{model="resnet",version="1"} 5.0' in lines


def test_failure_counter_has_every_reason() -> None:
    lines = _lines(render_text(_registry(ModelMetricsSource("m", "2", _busy_stats()))))
    failures = {line for line in lines if line.startswith("nv_inference_request_failure{")}
    assert failures == {
        'nv_inference_request_failure{model="m",reason="REJECTED",version="2"} 2',
        'nv_inference_request_failure{model="m",reason="CANCELED",version="2"} 0',
        'nv_inference_request_failure{model="m",reason="BACKEND",version="2"} 1',
        'nv_inference_request_failure{model="m",reason="OTHER",version="2"} 0',
    }


def test_batch_size_histogram_is_built_from_batch_counts() -> None:
    source = ModelMetricsSource("m", "1", _busy_stats(), max_batch_size=16)
    families = {
        f.name: f for f in text_string_to_metric_families(render_text(_registry(source)).decode())
    }
    histogram = families["nv_inference_batch_size"]
    assert histogram.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert buckets == {
        "1.0": 1.0,
        "2.0": 1.0,
        "4.0": 3.0,
        "8.0": 4.0,
        "16.0": 4.0,
        "+Inf": 4.0,
    }
    by_name = {s.name: s.value for s in histogram.samples if not s.name.endswith("_bucket")}
    assert by_name == {"nv_inference_batch_size_count": 4.0, "nv_inference_batch_size_sum": 15.0}


def test_batch_size_buckets_reach_the_largest_size_seen() -> None:
    buckets, total = batch_size_buckets({5: 2, 40: 1})
    assert [le for le, _ in buckets] == ["1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "+Inf"]
    assert [v for _, v in buckets] == [0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 3.0, 3.0]
    assert total == 50
    assert batch_size_buckets({}) == ([("1.0", 0.0), ("+Inf", 0.0)], 0)


def test_rendered_text_parses_and_labels_are_escaped() -> None:
    source = ModelMetricsSource('we"ird\\name', "7", ModelStats())
    text = render_text(_registry(source)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    success = families["nv_inference_request_success"]
    assert success.type == "counter"
    assert success.samples[0].labels == {"model": 'we"ird\\name', "version": "7"}


def test_generate_latest_gives_the_same_sample_names() -> None:
    registry = _registry(ModelMetricsSource("m", "1", _busy_stats()))
    lines = _lines(generate_latest(registry))
    assert 'nv_inference_request_success{model="m",version="1"} 3.0' in lines
    assert 'nv_inference_exec_count{model="m",version="1"} 4.0' in lines


def test_source_is_read_at_every_scrape() -> None:
    stats = ModelStats()
    models: list[ModelMetricsSource] = []
    registry = CollectorRegistry()
    registry.register(TritonMetricsCollector(lambda: models))
    assert "nv_inference_request_success{" not in render_text(registry).decode()
    models.append(ModelMetricsSource("late", "1", stats))
    stats.record_request_failure(request_ns=1, reason="CANCELED")
    text = render_text(registry).decode()
    assert 'nv_inference_request_failure{model="late",reason="CANCELED",version="1"} 1' in text


def test_registry_refuses_a_second_collector_with_the_same_names() -> None:
    registry = _registry()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(TritonMetricsCollector(list))


async def test_metrics_server_on_port_zero_answers_metrics() -> None:
    registry = _registry(ModelMetricsSource("served", "1", _busy_stats()))
    server = await start_metrics_server(registry, "127.0.0.1", 0)
    try:
        assert server.port > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.port}/metrics") as response,
        ):
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            body = await response.text()
    finally:
        await server.close()
    assert 'nv_inference_request_success{model="served",version="1"} 3' in body.splitlines()
