"""Prometheus exposition with Triton's metric names, read from ModelStats at scrape time.

Where it sits in the data flow: requests and batches are recorded once, into ``ModelStats``
(statistics.py). At scrape time ``TritonMetricsCollector`` asks its source callable for the
loaded model versions (name, version, stats, pending count) and turns the counters into metric
families; nothing on the hot path touches prometheus_client. ``metrics_app`` /
``start_metrics_server`` serve ``GET /metrics`` for a registry holding the collector.

Names, labels and HELP texts are Triton's (``nv_inference_request_success{model,version}``, ...,
``nv_inference_request_failure{model,reason,version}`` with every reason present), plus
``nv_inference_batch_size``, a histogram of formed batch sizes per model version (power-of-two
buckets built exactly from the per-batch-size execution counts).

Counter naming: Triton exposes its counters as ``# TYPE nv_inference_request_success counter``
with no ``_total`` suffix. prometheus_client's ``generate_latest`` always appends ``_total`` to the
HELP/TYPE lines of a counter family, so ``render_text`` writes the text format itself for every
``VerbatimFamily`` (the Triton counters, and families code above the kit builds the same way) and
leaves every other family to ``generate_latest``. Serve with ``render_text`` (``metrics_app`` does)
to match Triton byte for byte in names and types; ``generate_latest`` on the same registry gives
the same samples.

Families from above the kit: a service layer that must not be imported here (e.g. the Python
backend's custom metrics, services/python/custom_metrics.py) hands its collector to
``add_process_collector``; start_server's registry holds one ``ProcessCollectors``, which yields
their families after the Triton ones at every scrape.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from services.core.latency_metrics import MetricsConfig, latency_families
from services.core.statistics import FAILURE_REASONS, ModelStats

#: what GET /metrics answers with (the Prometheus text format Triton serves)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NS_PER_US = 1000


@dataclass(frozen=True, slots=True)
class ModelMetricsSource:
    """One loaded model version as the collector sees it at scrape time."""

    model: str
    version: str
    stats: ModelStats
    #: requests received and not yet executing (queued in the batcher)
    pending_count: int = 0
    #: the model's max_batch_size; fixes the histogram's largest bucket (0 = from the data)
    max_batch_size: int = 0


class VerbatimFamily(Metric):
    """A family ``render_text`` writes exactly as given, as Triton's exposition does: HELP/TYPE
    under ``name`` (a counter gets no ``_total``), each sample under its own name, label names
    sorted with ``le`` last, values as ``prometheus_number`` writes them."""


class TritonCounterFamily(VerbatimFamily):
    """A counter family exposed under its own name, without the ``_total`` suffix (as Triton)."""

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation, "counter")

    def add(self, labels: dict[str, str], value: int) -> None:
        self.add_sample(self.name, labels, float(value))


# name, HELP text (Triton's), the ModelStats reading
_COUNTERS: tuple[tuple[str, str, Callable[[ModelStats], int]], ...] = (
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        lambda s: s.success_count,
    ),
    (
        "nv_inference_count",
        "Number of inferences performed (does not include cached requests)",
        lambda s: s.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (does not include cached requests)",
        lambda s: s.execution_count,
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds (includes cached requests)",
        lambda s: s.request_ns // _NS_PER_US,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
        lambda s: s.queue_ns // _NS_PER_US,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
        lambda s: s.compute_input_ns // _NS_PER_US,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
        lambda s: s.compute_infer_ns // _NS_PER_US,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds "
        "(does not include cached requests)",
        lambda s: s.compute_output_ns // _NS_PER_US,
    ),
    (
        "nv_cache_num_hits_per_model",
        "Number of requests answered from the response cache per model",
        lambda s: s.cache_hit_count,
    ),
    (
        "nv_cache_num_misses_per_model",
        "Number of response cache misses per model",
        lambda s: s.cache_miss_count,
    ),
    (
        "nv_cache_hit_duration_per_model",
        "Cumulative time of response cache hits (lookup and fetch) per model in microseconds",
        lambda s: s.cache_hit_ns // _NS_PER_US,
    ),
    (
        "nv_cache_miss_duration_per_model",
        "Cumulative time of response cache misses (lookup and insertion) per model in microseconds",
        lambda s: s.cache_miss_ns // _NS_PER_US,
    ),
)
#: the counters ``counter_latencies=false`` turns off
_LATENCY_COUNTERS = frozenset(
    f"nv_inference_{kind}_duration_us"
    for kind in ("request", "queue", "compute_input", "compute_infer", "compute_output")
)
_FAILURE = ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes")
_PENDING = (
    "nv_inference_pending_request_count",
    "Instantaneous number of pending requests awaiting execution per-model.",
)
_BATCH_SIZE = (
    "nv_inference_batch_size",
    "Batch sizes of the model executions formed by the batcher",
)


class TritonMetricsCollector:
    """prometheus_client collector over ``source``, called once per scrape.

    ``source`` must be cheap and safe to call from the thread that serves the scrape (the event
    loop for ``metrics_app``).
    """

    def __init__(
        self,
        source: Callable[[], Iterable[ModelMetricsSource]],
        config: MetricsConfig | None = None,
    ) -> None:
        self._source = source
        self._config = config or MetricsConfig()

    def describe(self) -> Iterator[Metric]:
        """The families this collector yields (lets a registry refuse a clashing name)."""
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        return self._families(list(self._source()))

    def _families(self, models: list[ModelMetricsSource]) -> Iterator[Metric]:
        success_name, success_help, success_read = _COUNTERS[0]
        yield _counter(success_name, success_help, models, success_read)

        failure = TritonCounterFamily(*_FAILURE)
        for m in models:
            by_reason = m.stats.failures_by_reason()
            for reason in FAILURE_REASONS:
                labels = {"model": m.model, "reason": reason, "version": m.version}
                failure.add(labels, by_reason.get(reason, 0))
        yield failure

        for name, help_text, read in _COUNTERS[1:]:
            if self._config.counter_latencies or name not in _LATENCY_COUNTERS:
                yield _counter(name, help_text, models, read)

        pending = GaugeMetricFamily(*_PENDING, labels=("model", "version"))
        for m in models:
            pending.add_metric((m.model, m.version), float(m.pending_count))
        yield pending

        batch_size = HistogramMetricFamily(*_BATCH_SIZE, labels=("model", "version"))
        for m in models:
            buckets, total = batch_size_buckets(m.stats.batch_size_counts(), m.max_batch_size)
            batch_size.add_metric((m.model, m.version), buckets, float(total))
        yield batch_size
        recorders = ((m.model, m.version, m.stats.latency) for m in models)
        yield from latency_families(recorders, self._config)


def _counter(
    name: str,
    help_text: str,
    models: list[ModelMetricsSource],
    read: Callable[[ModelStats], int],
) -> TritonCounterFamily:
    family = TritonCounterFamily(name, help_text)
    for m in models:
        family.add({"model": m.model, "version": m.version}, read(m.stats))
    return family


def batch_size_buckets(
    counts: dict[int, int], max_batch_size: int = 0
) -> tuple[list[tuple[str, float]], int]:
    """Cumulative histogram buckets ``le`` = 1, 2, 4, ... and the sum of all batch sizes.

    The largest finite bucket is the smallest power of two covering both ``max_batch_size`` and
    the largest size seen, so a model's bucket layout stays fixed once max_batch_size is given.
    """
    top = max([max_batch_size, 1, *counts])
    bounds = [1]
    while bounds[-1] < top:
        bounds.append(bounds[-1] * 2)
    ordered = sorted(counts.items())
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    index = 0
    for bound in bounds:
        while index < len(ordered) and ordered[index][0] <= bound:
            cumulative += ordered[index][1]
            index += 1
        buckets.append((f"{float(bound)}", float(cumulative)))
    buckets.append(("+Inf", float(sum(counts.values()))))
    total = sum(size * count for size, count in ordered)
    return buckets, total


# ---------------------------------------------------------------------------- text exposition


class _OneFamily:
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> list[Metric]:
        return [self._metric]


def render_text(registry: Collector) -> bytes:
    """The Prometheus text format (0.0.4) of ``registry``; ``VerbatimFamily`` families (the Triton
    counters among them) as given, without ``_total``."""
    parts: list[bytes] = []
    for metric in registry.collect():
        if isinstance(metric, VerbatimFamily):
            parts.append(_render_verbatim(metric).encode("utf-8"))
        else:
            parts.append(generate_latest(_OneFamily(metric)))
    return b"".join(parts)


def prometheus_number(value: float) -> str:
    """A sample value or bucket bound as Triton writes it: ``3``, ``0.25``, ``+Inf``, ``NaN``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _render_verbatim(metric: VerbatimFamily) -> str:
    doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
    lines = [f"# HELP {metric.name} {doc}\n", f"# TYPE {metric.name} {metric.type}\n"]
    for sample in metric.samples:
        names = sorted(sample.labels, key=lambda k: (k == "le", k))
        labels = ",".join(f'{k}="{_escape_label(sample.labels[k])}"' for k in names)
        text = prometheus_number(float(sample.value))
        lines.append(f"{sample.name}{{{labels}}} {text}\n" if labels else f"{sample.name} {text}\n")
    return "".join(lines)


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


# ---------------------------------------------------------------------------- process-wide hook

_process_collectors: list[Collector] = []
_process_lock = threading.Lock()


def add_process_collector(collector: Collector) -> None:
    """Serve ``collector``'s families on this process's metrics endpoint (start_server's), after
    the Triton ones; adding the same collector twice adds it once. Its ``collect`` runs at every
    scrape, on the thread serving it: it must be quick, thread safe, and must not raise."""
    with _process_lock:
        if all(c is not collector for c in _process_collectors):
            _process_collectors.append(collector)


def remove_process_collector(collector: Collector) -> None:
    """Stop serving a collector given to ``add_process_collector`` (no-op if it was not)."""
    with _process_lock:
        _process_collectors[:] = [c for c in _process_collectors if c is not collector]


class ProcessCollectors:
    """The collectors given to ``add_process_collector``, read at every scrape (one added after
    the endpoint started shows from the next scrape on)."""

    def describe(self) -> list[Metric]:
        """No fixed names: the families come and go with the collectors."""
        return []

    def collect(self) -> Iterator[Metric]:
        with _process_lock:
            collectors = list(_process_collectors)
        for collector in collectors:
            yield from collector.collect()


# ---------------------------------------------------------------------------- HTTP endpoint


def metrics_app(registry: Collector) -> web.Application:
    """An aiohttp application answering ``GET /metrics`` with ``render_text(registry)``."""

    async def handle_metrics(_request: web.Request) -> web.Response:
        return web.Response(body=render_text(registry), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    return app


@dataclass(slots=True)
class MetricsServer:
    """A running metrics endpoint; ``port`` is the bound port (useful when asked for port 0)."""

    runner: web.AppRunner
    host: str
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_metrics_server(
    registry: Collector, host: str = "127.0.0.1", port: int = 8002
) -> MetricsServer:
    """Serve ``GET /metrics`` on ``host:port`` (0 picks a free port) until ``close()``."""
    runner = web.AppRunner(metrics_app(registry), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(
            exc.errno,
            f"cannot serve metrics on {host}:{port} ({exc.strerror}); "
            "choose another metrics port or free this one",
        ) from exc
    bound_port = int(runner.addresses[0][1])
    return MetricsServer(runner=runner, host=host, port=bound_port)
