"""pb_utils.MetricFamily / Metric: each kind's operations, labels, buckets, duplicates, lifetime,
the Prometheus text they produce next to the Triton families, and concurrent updates."""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.core.metrics import (
    ModelMetricsSource,
    ProcessCollectors,
    TritonMetricsCollector,
    add_process_collector,
    remove_process_collector,
    render_text,
)
from services.core.statistics import ModelStats
from services.python.custom_metrics import (
    COUNTER,
    CustomMetricsRegistry,
    MetricFamily,
    MetricKind,
    process_registry,
)
from services.python.triton_python_backend_utils import TritonModelException


@pytest.fixture
def store() -> CustomMetricsRegistry:
    return CustomMetricsRegistry()


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    """Threads switch as often as the interpreter lets them: updates and scrapes interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _family(store: CustomMetricsRegistry, name: str, kind: MetricKind) -> MetricFamily:
    return MetricFamily(name, f"{name} help", kind, registry=store)


def _text(store: CustomMetricsRegistry) -> str:
    registry = CollectorRegistry()
    registry.register(store)
    return render_text(registry).decode()


def _lines(store: CustomMetricsRegistry) -> list[str]:
    return _text(store).splitlines()


def test_counter_goes_up_and_refuses_the_rest(store: CustomMetricsRegistry) -> None:
    family = _family(store, "requests", MetricFamily.COUNTER)
    metric = family.Metric(labels={"model": "m"})
    assert metric.value() == 0.0
    metric.increment(2023)
    metric.increment(0.5)
    assert metric.value() == 2023.5
    with pytest.raises(TritonModelException, match=r"only goes up.*got -23\.5"):
        metric.increment(-23.5)
    with pytest.raises(TritonModelException, match=r"set\(\) is not supported for COUNTER"):
        metric.set(999.9)
    with pytest.raises(TritonModelException, match=r"observe\(\) is not supported for COUNTER"):
        metric.observe(0.05)
    assert metric.value() == 2023.5


def test_gauge_goes_both_ways_and_is_set(store: CustomMetricsRegistry) -> None:
    family = _family(store, "queue_depth", MetricFamily.GAUGE)
    metric = family.Metric()
    metric.increment(2023)
    metric.increment(-23.5)
    assert metric.value() == 1999.5
    metric.set(999.9)
    assert metric.value() == 999.9
    with pytest.raises(TritonModelException, match=r"observe\(\) is not supported for GAUGE"):
        metric.observe(1)
    with pytest.raises(TritonModelException, match="needs a number, got str"):
        metric.set("7")  # type: ignore[arg-type]


def test_histogram_observes_into_cumulative_buckets(store: CustomMetricsRegistry) -> None:
    family = _family(store, "latency_s", MetricFamily.HISTOGRAM)
    metric = family.Metric(labels={"b": "2", "a": "1"}, buckets=[0.1, 1.0, 2.5, 5.0, 10.0])
    for value in (0.05, 1.0, 1.5, 6.0):
        metric.observe(value)
    for operation in ("value", "increment", "set"):
        with pytest.raises(TritonModelException, match="a HISTOGRAM supports observe"):
            getattr(metric, operation)(*([] if operation == "value" else [1.0]))
    lines = _lines(store)
    labels = 'a="1",b="2"'
    assert lines == [
        "# HELP latency_s latency_s help",
        "# TYPE latency_s histogram",
        f"latency_s_count{{{labels}}} 4",
        f"latency_s_sum{{{labels}}} 8.55",
        f'latency_s_bucket{{{labels},le="0.1"}} 1',
        f'latency_s_bucket{{{labels},le="1"}} 2',  # a value on a bound falls in that bucket
        f'latency_s_bucket{{{labels},le="2.5"}} 3',
        f'latency_s_bucket{{{labels},le="5"}} 3',
        f'latency_s_bucket{{{labels},le="10"}} 4',
        f'latency_s_bucket{{{labels},le="+Inf"}} 4',
    ]


def test_histogram_buckets_are_checked(store: CustomMetricsRegistry) -> None:
    family = _family(store, "sizes", MetricFamily.HISTOGRAM)
    with pytest.raises(TritonModelException, match=r"needs buckets=\[\.\.\.\]"):
        family.Metric(labels={})
    with pytest.raises(TritonModelException, match="strictly increasing"):
        family.Metric(buckets=[2.5, 0.1, 1.0])
    with pytest.raises(TritonModelException, match="strictly increasing"):
        family.Metric(buckets=[1, 1, 2])
    with pytest.raises(TritonModelException, match="must be finite"):
        family.Metric(buckets=[1, float("inf")])
    with pytest.raises(TritonModelException, match="'le' is the bucket label"):
        family.Metric(labels={"le": "1"}, buckets=[1])
    only_inf = family.Metric(buckets=[])
    only_inf.observe(3)
    assert 'sizes_bucket{le="+Inf"} 1' in _lines(store)
    gauge = _family(store, "g", MetricFamily.GAUGE)
    with pytest.raises(TritonModelException, match="buckets are for HISTOGRAM families"):
        gauge.Metric(buckets=[1.0])


def test_names_labels_and_kind_are_checked(store: CustomMetricsRegistry) -> None:
    with pytest.raises(TritonModelException, match="not a Prometheus metric name"):
        _family(store, "9lives", MetricFamily.GAUGE)
    with pytest.raises(TritonModelException, match="'nv_' prefix is reserved"):
        _family(store, "nv_inference_count", MetricFamily.COUNTER)
    with pytest.raises(TritonModelException, match=r"kind must be pb_utils\.MetricFamily\.COUNTER"):
        MetricFamily("x", "x", "COUNTER", registry=store)  # type: ignore[arg-type]
    family = _family(store, "x", MetricFamily.GAUGE)
    with pytest.raises(TritonModelException, match="not a Prometheus label name"):
        family.Metric(labels={"bad-name": "v"})
    with pytest.raises(TritonModelException, match="not a Prometheus label name"):
        family.Metric(labels={"__reserved": "v"})
    with pytest.raises(TritonModelException, match="label 'n' must be a str, got int"):
        family.Metric(labels={"n": 1})  # type: ignore[dict-item]


def test_same_name_same_kind_is_one_family_first_description_kept(
    store: CustomMetricsRegistry,
) -> None:
    first = MetricFamily("dup_family", "first description", COUNTER, registry=store)
    second = MetricFamily("dup_family", "second description", COUNTER, registry=store)
    first.Metric(labels={"key": "label1"}).increment(1)
    kept = second.Metric(labels={"key": "label2"})
    del first
    lines = _lines(store)
    assert lines == [
        "# HELP dup_family first description",
        "# TYPE dup_family counter",
        'dup_family{key="label2"} 0',  # label1's Metric object is gone, and its series with it
    ]
    assert kept.value() == 0


def test_same_name_other_kind_raises(store: CustomMetricsRegistry) -> None:
    family = _family(store, "clash", MetricFamily.COUNTER)
    with pytest.raises(TritonModelException, match=r"already exists as a COUNTER.*GAUGE"):
        _family(store, "clash", MetricFamily.GAUGE)
    assert family.Metric().value() == 0


def test_same_labels_share_one_series(store: CustomMetricsRegistry) -> None:
    family = _family(store, "shared", MetricFamily.COUNTER)
    one = family.Metric(labels={"a": "1", "b": "2"})
    two = family.Metric(labels={"b": "2", "a": "1"})
    one.increment(7.5)
    assert two.value() == 7.5
    del one
    two.increment(1)
    assert 'shared{a="1",b="2"} 8.5' in _lines(store)


def test_metric_of_a_deleted_family_raises(store: CustomMetricsRegistry) -> None:
    family = _family(store, "lifetime", MetricFamily.GAUGE)
    metric = family.Metric(labels={"x": "y"})
    del family
    for call in (lambda: metric.set(10), lambda: metric.increment(1), metric.value):
        with pytest.raises(TritonModelException, match="MetricFamily object it was created from"):
            call()
    assert "lifetime" not in _text(store)


def test_dropped_objects_stop_being_exported_and_the_name_is_free_again(
    store: CustomMetricsRegistry,
) -> None:
    family = _family(store, "reloaded", MetricFamily.COUNTER)
    metric = family.Metric()
    metric.increment(5)
    assert "reloaded 5" in _lines(store)
    del metric
    assert "reloaded" not in _text(store)  # a family with no series is not shown
    del family
    again = _family(store, "reloaded", MetricFamily.GAUGE)  # a new kind is fine once it is gone
    kept = again.Metric()
    kept.set(1)
    assert _lines(store)[-2:] == ["# TYPE reloaded gauge", "reloaded 1"]


class _Model:
    """A model object caught in a reference cycle: only the garbage collector frees it."""

    def __init__(self, store: CustomMetricsRegistry) -> None:
        self.me = self
        self.family = _family(store, "cyclic", MetricFamily.COUNTER)
        self.metric = self.family.Metric()


def test_a_dead_models_cycle_does_not_block_a_new_kind(store: CustomMetricsRegistry) -> None:
    gc.disable()
    try:
        _Model(store).metric.increment(3)
        assert "cyclic 3" in _lines(store)  # garbage, not yet collected
        replacement = _family(store, "cyclic", MetricFamily.GAUGE)
    finally:
        gc.enable()
    kept = replacement.Metric()
    kept.set(2)
    assert "cyclic 2" in _lines(store)


def test_exposition_parses_next_to_the_triton_families(store: CustomMetricsRegistry) -> None:
    counter = MetricFamily("vllm:prompt_tokens_total", 'a "quoted"\\help', COUNTER, registry=store)
    tokens = counter.Metric(labels={"model": 'we"ird\\name\n'})
    tokens.increment(3)
    gauges = _family(store, "temperature", MetricFamily.GAUGE)
    gauge = gauges.Metric()
    gauge.set(float("nan"))
    registry = CollectorRegistry()
    stats = ModelStats()
    stats.record_request_failure(request_ns=1, reason="REJECTED")
    registry.register(TritonMetricsCollector(lambda: [ModelMetricsSource("m", "1", stats)]))
    registry.register(store)
    text = render_text(registry).decode()
    assert "# TYPE vllm:prompt_tokens_total counter" in text  # as given: no _total added
    assert "temperature NaN" in text.splitlines()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["vllm:prompt_tokens"].samples[0].labels == {"model": 'we"ird\\name\n'}
    assert families["vllm:prompt_tokens"].documentation == 'a "quoted"\\help'
    assert families["nv_inference_request_failure"].type == "counter"


def test_process_registry_is_served_through_the_process_collectors() -> None:
    registry = CollectorRegistry()
    registry.register(ProcessCollectors())
    family = MetricFamily("process_wide_gauge", "served by every endpoint", MetricFamily.GAUGE)
    metric = family.Metric(labels={"where": "process"})
    metric.set(4)
    assert process_registry() is process_registry()
    assert 'process_wide_gauge{where="process"} 4' in render_text(registry).decode()
    extra = CustomMetricsRegistry()
    add_process_collector(extra)
    add_process_collector(extra)  # once only
    try:
        extra_family = _family(extra, "extra_gauge", MetricFamily.GAUGE)
        extra_metric = extra_family.Metric()
        extra_metric.set(1)
        assert render_text(registry).decode().count("extra_gauge 1") == 1
    finally:
        remove_process_collector(extra)
    assert "extra_gauge" not in render_text(registry).decode()


@pytest.mark.usefixtures("frequent_switches")
def test_concurrent_metrics_and_scrapes_lose_nothing(store: CustomMetricsRegistry) -> None:
    family = _family(store, "hits", MetricFamily.COUNTER)
    held = family.Metric(labels={"shared": "yes"})  # keeps the series while threads come and go
    threads, per_thread = 8, 500
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            counter = family.Metric(labels={"shared": "yes"})  # made and dropped in every thread
            counter.increment(1)
            _text(store)  # scrapes interleave with updates and releases

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert held.value() == threads * per_thread
    assert _lines(store)[-1] == f'hits{{shared="yes"}} {threads * per_thread}'


@pytest.mark.usefixtures("frequent_switches")
def test_concurrent_increments_reach_the_exact_total(store: CustomMetricsRegistry) -> None:
    counters = _family(store, "exact", MetricFamily.COUNTER)
    histograms = _family(store, "exact_obs", MetricFamily.HISTOGRAM)
    metric = counters.Metric()
    observed = histograms.Metric(buckets=[0.5])
    threads, per_thread = 8, 5000
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        start.wait()
        for _ in range(per_thread):
            metric.increment(1)
            observed.observe(index % 2)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    total = threads * per_thread
    assert metric.value() == total
    lines = _lines(store)
    assert f"exact {total}" in lines
    assert f"exact_obs_count {total}" in lines
    assert f'exact_obs_bucket{{le="0.5"}} {total // 2}' in lines
