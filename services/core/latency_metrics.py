"""Triton's ``--metrics-config`` latency metrics: the cumulative counters (on unless
``counter_latencies=false``), summaries over a sliding window (``summary_latencies=true``,
``summary_quantiles=0.5:0.05,...``) and the request-to-first-response histogram
(``histogram_latencies=true``).

Where it sits in the data flow: the service's settings hold one ``MetricsConfig``; the model
manager gives each loaded model version a ``LatencyRecorder`` when summaries or histograms are on
(``ModelStats.attach_latency``). ModelStats feeds it every successful request (cache hits count
in the request and queue summaries only, as in the counters); the data plane feeds it a
decoupled model's first response. At scrape time ``latency_families`` turns the recorders into
Prometheus families with Triton's names:

* ``nv_inference_{request,queue,compute_input,compute_infer,compute_output}_summary_us``:
  quantiles of the last ``max_age`` seconds (60, in 5 age buckets, as Triton's), estimated from
  a uniform sample of up to 1,024 requests per age bucket; ``_count`` and ``_sum`` since load.
* ``nv_inference_first_response_histogram_ms``: milliseconds from a request's arrival to its
  first response. Triton keeps it for decoupled models; here every model has it (a model that is
  not decoupled answers once: its request time), so any model's latency percentiles can be
  computed across replicas with ``histogram_quantile``. Default buckets include Triton's (100,
  500, 2000, 5000 ms) with finer ones below; a model's config overrides them with
  ``model_metrics { metric_control { metric_identifier { family:
  "nv_inference_first_response_histogram_ms" } histogram_options { buckets: [...] } } }``.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.metrics_core import HistogramMetricFamily, Metric

from protos.gen.inference import model_config_pb2 as mc

#: Triton's default summary quantiles and their allowed errors
DEFAULT_QUANTILES: tuple[tuple[float, float], ...] = (
    (0.5, 0.05),
    (0.9, 0.01),
    (0.95, 0.001),
    (0.99, 0.001),
    (0.999, 0.0001),
)
FIRST_RESPONSE = "nv_inference_first_response_histogram_ms"
#: milliseconds; Triton's 100, 500, 2000, 5000 among them
DEFAULT_FIRST_RESPONSE_BUCKETS: tuple[float, ...] = (
    0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000,
)  # fmt: skip
#: the window the summaries' quantiles cover, in seconds, and how many age buckets make it
MAX_AGE_S = 60.0
AGE_BUCKETS = 5
#: samples kept per age bucket (uniformly chosen among the bucket's requests)
SAMPLES_PER_BUCKET = 1024

_NS_PER_US = 1_000
_NS_PER_MS = 1_000_000
_BOOL = {"true": True, "false": False}

#: the summaries: name suffix, HELP text
SUMMARIES: tuple[tuple[str, str], ...] = (
    ("request", "Summary of inference request duration in microseconds (includes cached requests)"),
    ("queue", "Summary of inference queuing duration in microseconds (includes cached requests)"),
    (
        "compute_input",
        "Summary of compute input duration in microseconds (does not include cached requests)",
    ),
    (
        "compute_infer",
        "Summary of compute inference duration in microseconds (does not include cached requests)",
    ),
    (
        "compute_output",
        "Summary of compute output duration in microseconds (does not include cached requests)",
    ),
)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Which latency metrics the service exports (tritonserver's ``--metrics-config``)."""

    counter_latencies: bool = True
    summary_latencies: bool = False
    summary_quantiles: tuple[tuple[float, float], ...] = DEFAULT_QUANTILES
    histogram_latencies: bool = False

    @property
    def records(self) -> bool:
        """Whether models need a LatencyRecorder (summaries or histograms are on)."""
        return self.summary_latencies or self.histogram_latencies


def parse_metrics_config(values: Sequence[str]) -> MetricsConfig:
    """``--metrics-config key=value`` values (the flag may repeat) as a MetricsConfig."""
    settings: dict[str, object] = {}
    for value in values:
        key, sep, text = (part.strip() for part in value.partition("="))
        if not sep:
            raise ValueError(f"--metrics-config {value!r}: write it as key=value")
        if key in ("counter_latencies", "summary_latencies", "histogram_latencies"):
            if text.lower() not in _BOOL:
                raise ValueError(f"--metrics-config {value!r}: {key} takes true or false")
            settings[key] = _BOOL[text.lower()]
        elif key == "summary_quantiles":
            settings[key] = _quantiles(value, text)
        else:
            raise ValueError(
                f"--metrics-config {value!r}: unknown setting '{key}'; use counter_latencies,"
                " summary_latencies, summary_quantiles or histogram_latencies"
            )
    return MetricsConfig(**settings)  # type: ignore[arg-type]


def _quantiles(value: str, text: str) -> tuple[tuple[float, float], ...]:
    pairs: list[tuple[float, float]] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        q, sep, err = item.partition(":")
        try:
            pair = (float(q), float(err)) if sep else (-1.0, 0.0)
        except ValueError:
            pair = (-1.0, 0.0)
        if not (0 < pair[0] < 1 and 0 <= pair[1] < 1):
            raise ValueError(
                f"--metrics-config {value!r}: give quantile:error pairs between 0 and 1,"
                " e.g. summary_quantiles=0.5:0.05,0.99:0.001"
            )
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"--metrics-config {value!r}: no quantiles given")
    return tuple(pairs)


@dataclass(slots=True)
class _AgeBucket:
    start: float
    seen: int = 0
    samples: list[float] = field(default_factory=list)


class SlidingQuantiles:
    """Quantiles of the values observed over the last ``max_age_s`` seconds, plus the count and
    sum of every value observed. Not thread safe: observe and read on one thread."""

    def __init__(
        self,
        quantiles: Sequence[float],
        *,
        max_age_s: float = MAX_AGE_S,
        age_buckets: int = AGE_BUCKETS,
        capacity: int = SAMPLES_PER_BUCKET,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._quantiles = tuple(quantiles)
        self._width = max_age_s / age_buckets
        self._age_buckets = age_buckets
        self._capacity = capacity
        self._clock = clock
        self._rng = rng or random.Random()
        self._buckets: deque[_AgeBucket] = deque([_AgeBucket(clock())])
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        bucket = self._current()
        bucket.seen += 1
        if len(bucket.samples) < self._capacity:
            bucket.samples.append(value)
        else:
            slot = self._rng.randrange(bucket.seen)
            if slot < self._capacity:
                bucket.samples[slot] = value

    def values(self) -> list[float]:
        """Each quantile's value over the window (NaN when nothing was observed in it)."""
        self._current()
        merged = sorted(v for b in self._buckets for v in b.samples)
        if not merged:
            return [math.nan] * len(self._quantiles)
        top = len(merged) - 1
        return [merged[min(top, max(0, math.ceil(q * len(merged)) - 1))] for q in self._quantiles]

    def _current(self) -> _AgeBucket:
        now = self._clock()
        newest = self._buckets[-1]
        if now - newest.start >= self._width:
            # skip the buckets no value fell into; keep the window's start on the bucket grid
            start = newest.start + (now - newest.start) // self._width * self._width
            self._buckets.append(_AgeBucket(start))
            cutoff = start - self._width * (self._age_buckets - 0.5)
            while self._buckets[0].start < cutoff:  # older than the last age_buckets buckets
                self._buckets.popleft()
        return self._buckets[-1]


class LatencyRecorder:
    """One model version's summaries and first-response histogram."""

    def __init__(
        self,
        config: MetricsConfig,
        model: mc.ModelConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        quantiles = [q for q, _ in config.summary_quantiles]
        self.quantiles = quantiles
        self.summaries: dict[str, SlidingQuantiles] | None = (
            {kind: SlidingQuantiles(quantiles, clock=clock) for kind, _ in SUMMARIES}
            if config.summary_latencies
            else None
        )
        self.bounds: tuple[float, ...] = first_response_buckets(model)
        self.histogram: list[int] | None = (
            [0] * (len(self.bounds) + 1) if config.histogram_latencies else None
        )
        self.histogram_sum_ms = 0.0
        #: a decoupled model's first response is reported by the data plane, not on success
        self._decoupled = model.model_transaction_policy.decoupled

    def on_success(
        self, request_ns: int, queue_ns: int, c_in: int, c_infer: int, c_out: int, cached: bool
    ) -> None:
        summaries = self.summaries
        if summaries is not None:
            summaries["request"].observe(request_ns / _NS_PER_US)
            summaries["queue"].observe(queue_ns / _NS_PER_US)
            if not cached:
                summaries["compute_input"].observe(c_in / _NS_PER_US)
                summaries["compute_infer"].observe(c_infer / _NS_PER_US)
                summaries["compute_output"].observe(c_out / _NS_PER_US)
        if not self._decoupled:
            self.on_first_response(request_ns)

    def on_first_response(self, since_arrival_ns: int) -> None:
        if self.histogram is not None:
            ms = since_arrival_ns / _NS_PER_MS
            self.histogram[bisect.bisect_left(self.bounds, ms)] += 1
            self.histogram_sum_ms += ms


def first_response_buckets(model: mc.ModelConfig) -> tuple[float, ...]:
    """The model's own buckets for the first-response histogram (model_metrics), else ours."""
    for control in model.model_metrics.metric_control:
        if control.metric_identifier.family == FIRST_RESPONSE:
            return tuple(sorted(set(control.histogram_options.buckets)))
    return DEFAULT_FIRST_RESPONSE_BUCKETS


def latency_families(
    models: Iterable[tuple[str, str, LatencyRecorder | None]], config: MetricsConfig
) -> Iterator[Metric]:
    """The summary and histogram families over ``(model, version, recorder)``."""
    recorded = [(m, v, r) for m, v, r in models if r is not None]
    if config.summary_latencies:
        for kind, help_text in SUMMARIES:
            name = f"nv_inference_{kind}_summary_us"
            family = Metric(name, help_text, "summary")
            for model, version, recorder in recorded:
                if recorder.summaries is None:
                    continue
                summary = recorder.summaries[kind]
                labels = {"model": model, "version": version}
                for q, value in zip(recorder.quantiles, summary.values(), strict=True):
                    family.add_sample(name, {**labels, "quantile": repr(q)}, value)
                family.add_sample(f"{name}_count", labels, summary.count)
                family.add_sample(f"{name}_sum", labels, summary.sum)
            yield family
    if config.histogram_latencies:
        histogram = HistogramMetricFamily(
            FIRST_RESPONSE,
            "Duration from request to first response in milliseconds",
            labels=("model", "version"),
        )
        for model, version, recorder in recorded:
            if recorder.histogram is None:
                continue
            cumulative, buckets = 0, []
            for bound, count in zip((*recorder.bounds, math.inf), recorder.histogram, strict=True):
                cumulative += count
                buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), cumulative))
            histogram.add_metric((model, version), buckets, recorder.histogram_sum_ms)
        yield histogram
