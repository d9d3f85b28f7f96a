"""--metrics-config latency metrics: parsing, the sliding-window quantiles (fake clock), what a
model's recorder takes from a request, and the families as the metrics endpoint writes them."""

from __future__ import annotations

import math
import random

import pytest
from google.protobuf import text_format
from prometheus_client.registry import CollectorRegistry

from protos.gen.inference import model_config_pb2 as mc
from services.core.latency_metrics import (
    DEFAULT_FIRST_RESPONSE_BUCKETS,
    DEFAULT_QUANTILES,
    LatencyRecorder,
    MetricsConfig,
    SlidingQuantiles,
    parse_metrics_config,
)
from services.core.metrics import ModelMetricsSource, TritonMetricsCollector, render_text
from services.core.statistics import ModelStats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _model(text: str = "") -> mc.ModelConfig:
    return text_format.Parse(f'name: "m" {text}', mc.ModelConfig())


# ---- parsing ----------------------------------------------------------------------------------
def test_metrics_config_defaults_and_keys() -> None:
    assert parse_metrics_config([]) == MetricsConfig()
    assert MetricsConfig().summary_quantiles == DEFAULT_QUANTILES and not MetricsConfig().records
    config = parse_metrics_config(
        [
            "counter_latencies=false",
            "summary_latencies=true",
            "histogram_latencies=TRUE",
            "summary_quantiles=0.5:0.05, 0.99:0.001",
        ]
    )
    assert (config.counter_latencies, config.summary_latencies, config.histogram_latencies) == (
        False,
        True,
        True,
    )
    assert config.summary_quantiles == ((0.5, 0.05), (0.99, 0.001)) and config.records


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("summary_latencies", "key=value"),
        ("summary_latencies=yes", "true or false"),
        ("summary_quantiles=0.5", "quantile:error"),
        ("summary_quantiles=1.5:0.1", "quantile:error"),
        ("summary_quantiles=", "no quantiles"),
        ("histogram_buckets=1,2", "unknown setting 'histogram_buckets'"),
    ],
)
def test_metrics_config_errors_say_what_to_write(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_metrics_config([value])


# ---- sliding quantiles --------------------------------------------------------------------------
def test_quantiles_of_the_values_observed() -> None:
    q = SlidingQuantiles([0.5, 0.9, 0.99], clock=Clock())
    assert all(math.isnan(v) for v in q.values())
    for value in range(1, 101):
        q.observe(float(value))
    assert q.values() == [50.0, 90.0, 99.0]
    assert (q.count, q.sum) == (100, 5050.0)


def test_old_values_leave_the_window_but_stay_in_count_and_sum() -> None:
    clock = Clock()
    q = SlidingQuantiles([0.5], max_age_s=60, age_buckets=5, clock=clock)
    for _ in range(10):
        q.observe(1000.0)
    clock.now += 30
    for _ in range(10):
        q.observe(1.0)
    assert q.values() == [1.0]  # half the window is 1000s, half 1s: the median is the lower
    clock.now += 40  # the 1000s are now 70 s old
    assert q.values() == [1.0]
    clock.now += 60
    assert math.isnan(q.values()[0])
    assert (q.count, q.sum) == (20, 10010.0)


def test_a_busy_window_keeps_a_bounded_uniform_sample() -> None:
    q = SlidingQuantiles([0.5, 0.99], capacity=500, clock=Clock(), rng=random.Random(7))
    for value in range(100_000):
        q.observe(float(value))
    median, p99 = q.values()
    assert 45_000 < median < 55_000 and 97_000 < p99 <= 99_999
    assert q.count == 100_000


# ---- the recorder -------------------------------------------------------------------------------
def test_a_request_feeds_every_summary_and_the_histogram() -> None:
    recorder = LatencyRecorder(
        MetricsConfig(summary_latencies=True, histogram_latencies=True), _model()
    )
    recorder.on_success(3_000_000, 1_000_000, 10_000, 1_500_000, 20_000, cached=False)
    recorder.on_success(400_000, 0, 0, 0, 0, cached=True)
    assert recorder.summaries is not None and recorder.histogram is not None
    assert recorder.summaries["request"].count == 2 and recorder.summaries["queue"].count == 2
    assert recorder.summaries["compute_infer"].count == 1  # a cache hit ran nothing
    assert recorder.summaries["compute_infer"].sum == 1500.0  # microseconds
    assert recorder.bounds == DEFAULT_FIRST_RESPONSE_BUCKETS
    assert sum(recorder.histogram) == 2 and recorder.histogram_sum_ms == pytest.approx(3.4)


def test_a_decoupled_models_histogram_waits_for_its_first_response() -> None:
    model = _model("model_transaction_policy { decoupled: true }")
    recorder = LatencyRecorder(MetricsConfig(histogram_latencies=True), model)
    recorder.on_success(50_000_000, 0, 0, 0, 0, cached=False)
    assert recorder.histogram is not None and sum(recorder.histogram) == 0
    recorder.on_first_response(7_000_000)
    assert sum(recorder.histogram) == 1 and recorder.histogram_sum_ms == 7.0


def test_a_models_config_sets_its_histogram_buckets() -> None:
    model = _model(
        "model_metrics { metric_control { metric_identifier { family: "
        '"nv_inference_first_response_histogram_ms" } histogram_options { buckets: [ 5, 1, 2 ] } } }'
    )
    assert LatencyRecorder(MetricsConfig(histogram_latencies=True), model).bounds == (1, 2, 5)


# ---- exposition ---------------------------------------------------------------------------------
def _scrape(config: MetricsConfig, stats: ModelStats) -> str:
    registry = CollectorRegistry()
    registry.register(TritonMetricsCollector(lambda: [ModelMetricsSource("m", "1", stats)], config))
    return render_text(registry).decode()


def test_the_families_as_the_endpoint_writes_them() -> None:
    config = MetricsConfig(
        summary_latencies=True, histogram_latencies=True, summary_quantiles=((0.5, 0.05),)
    )
    stats = ModelStats()
    stats.attach_latency(LatencyRecorder(config, _model()))
    stats.record_request_success(
        request_ns=2_000_000,
        queue_ns=500_000,
        compute_input_ns=1_000,
        compute_infer_ns=1_000_000,
        compute_output_ns=2_000,
    )
    text = _scrape(config, stats)
    assert "# TYPE nv_inference_queue_summary_us summary" in text
    assert 'nv_inference_queue_summary_us{model="m",quantile="0.5",version="1"} 500.0' in text
    assert 'nv_inference_request_summary_us_count{model="m",version="1"} 1.0' in text
    assert "# TYPE nv_inference_first_response_histogram_ms histogram" in text
    assert (
        'nv_inference_first_response_histogram_ms_bucket{le="2.5",model="m",version="1"} 1.0'
        in text
    )
    assert (
        'nv_inference_first_response_histogram_ms_bucket{le="1.0",model="m",version="1"} 0.0'
        in text
    )
    assert "nv_inference_request_duration_us{" in text


def test_defaults_export_counters_only_and_counters_can_be_turned_off() -> None:
    text = _scrape(MetricsConfig(), ModelStats())
    assert "nv_inference_queue_duration_us{" in text and "summary" not in text
    assert "first_response" not in text
    text = _scrape(MetricsConfig(counter_latencies=False), ModelStats())
    assert "_duration_us{" not in text
    assert "nv_inference_request_success{" in text and "nv_inference_count{" in text
