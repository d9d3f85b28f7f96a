"""Per model-version inference statistics with Triton's semantics.

Where it sits in the data flow: the batcher and the transports record into one ModelStats per
loaded model version as requests finish (``record_request_success`` / ``record_request_failure``)
and as batches execute (``record_execution``). Two readers share the same numbers, so nothing is
counted twice on the hot path:

* the ModelStatistics RPC (gRPC and ``GET v2/models/.../stats``) reads ``to_proto()``;
* the Prometheus collector in ``metrics.py`` reads the plain read-only counters at scrape time.

Semantics follow Triton's statistics extension:

* ``inference_stats.success``: one per successful request, with its end-to-end duration;
  ``queue`` and ``compute_input/infer/output`` are counted once per successful request with the
  durations that request saw (each request of a batch carries the whole batch's compute times).
* ``inference_stats.fail``: one per failed request, with its duration; the failure reason
  (``ServingError.reason``) is kept per reason for ``nv_inference_request_failure{reason}``.
* ``execution_count`` / ``inference_count``: one execution per batch run on the model, and the
  number of inferences (batch size) it performed; ``batch_stats`` accumulates per batch size.
  Models without batching record each execution as batch size 1.
* ``cache_hit`` / ``cache_miss`` (response_cache.py): a hit is a success counted in ``queue``
  (with 0 ns) but not in ``compute_*``, ``execution_count`` or ``inference_count``.
* ``last_inference``: milliseconds since the epoch of the last execution (0 = never).

Threading: every ``record_*`` call must come from the event loop thread. Readers on another thread
(a scrape served by a thread) get consistent-enough values: every read is of a plain int, and the
per-size and per-reason tables are copied in one C-level operation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from protos.gen.inference import grpc_service_pb2 as pb
from services.core.latency_metrics import LatencyRecorder

#: Triton's nv_inference_request_failure reasons, always exported (zero until they happen).
FAILURE_REASONS: tuple[str, ...] = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

_NS_PER_MS = 1_000_000


@dataclass(slots=True)
class BatchStats:
    """What all executions of one batch size added up to."""

    #: how many executions ran with this batch size
    count: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0


class ModelStats:
    """Cumulative statistics of one model version since it was loaded.

    ``wall_clock_ns`` gives the time used for ``last_inference`` (injectable for tests).
    """

    __slots__ = (
        "_batch_stats",
        "_cache_hit_count",
        "_cache_hit_ns",
        "_cache_miss_count",
        "_cache_miss_ns",
        "_compute_infer_ns",
        "_compute_input_ns",
        "_compute_output_ns",
        "_execution_count",
        "_failure_by_reason",
        "_failure_count",
        "_failure_ns",
        "_inference_count",
        "_last_inference_ms",
        "_latency",
        "_queue_ns",
        "_success_count",
        "_success_ns",
        "_wall_clock_ns",
    )

    def __init__(self, *, wall_clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._wall_clock_ns = wall_clock_ns
        self._success_count = 0
        self._success_ns = 0
        self._failure_count = 0
        self._failure_ns = 0
        self._failure_by_reason: dict[str, int] = dict.fromkeys(FAILURE_REASONS, 0)
        self._queue_ns = 0
        self._compute_input_ns = 0
        self._compute_infer_ns = 0
        self._compute_output_ns = 0
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0
        self._batch_stats: dict[int, BatchStats] = {}
        self._cache_hit_count = 0
        self._cache_hit_ns = 0
        self._cache_miss_count = 0
        self._cache_miss_ns = 0
        self._latency: LatencyRecorder | None = None

    # ----------------------------------------------------------------- recording (hot path)

    def record_request_success(
        self,
        *,
        request_ns: int,
        queue_ns: int,
        compute_input_ns: int,
        compute_infer_ns: int,
        compute_output_ns: int,
    ) -> None:
        """One request answered successfully, with the durations it saw (nanoseconds)."""
        self._success_count += 1
        self._success_ns += request_ns
        self._queue_ns += queue_ns
        self._compute_input_ns += compute_input_ns
        self._compute_infer_ns += compute_infer_ns
        self._compute_output_ns += compute_output_ns
        if self._latency is not None:
            self._latency.on_success(
                request_ns, queue_ns, compute_input_ns, compute_infer_ns, compute_output_ns, False
            )

    def record_cache_hit(self, *, request_ns: int, lookup_ns: int) -> None:
        """One request answered from the response cache: a success that waited in no queue and
        ran nothing (``lookup_ns``: finding and fetching the stored outputs)."""
        self._success_count += 1
        self._success_ns += request_ns
        self._cache_hit_count += 1
        self._cache_hit_ns += lookup_ns
        if self._latency is not None:
            self._latency.on_success(request_ns, 0, 0, 0, 0, True)

    def record_cache_miss(self, ns: int) -> None:
        """One request looked up in vain, run, and its outputs stored (``ns``: lookup and
        insertion)."""
        self._cache_miss_count += 1
        self._cache_miss_ns += ns

    def record_request_failure(self, *, request_ns: int, reason: str) -> None:
        """One request failed after ``request_ns``; ``reason`` is ``ServingError.reason``.

        A reason outside Triton's set (REJECTED, CANCELED, BACKEND, OTHER) is counted as OTHER,
        so the metric keeps Triton's label values.
        """
        self._failure_count += 1
        self._failure_ns += request_ns
        key = reason if reason in self._failure_by_reason else "OTHER"
        self._failure_by_reason[key] += 1

    def record_execution(
        self,
        *,
        batch_size: int,
        inference_count: int,
        compute_input_ns: int,
        compute_infer_ns: int,
        compute_output_ns: int,
    ) -> None:
        """One batch executed on the model.

        ``batch_size`` is the size of the batch as run (the key of ``batch_stats``; 1 for models
        without batching); ``inference_count`` is the number of inferences it performed for
        callers (usually the same number).
        """
        if batch_size < 1:
            raise ValueError(
                f"record_execution needs batch_size >= 1, got {batch_size}; "
                "record models without batching as batch size 1"
            )
        self._execution_count += 1
        self._inference_count += inference_count
        stats = self._batch_stats.get(batch_size)
        if stats is None:
            stats = self._batch_stats[batch_size] = BatchStats()
        stats.count += 1
        stats.compute_input_ns += compute_input_ns
        stats.compute_infer_ns += compute_infer_ns
        stats.compute_output_ns += compute_output_ns
        now_ms = self._wall_clock_ns() // _NS_PER_MS
        if now_ms > self._last_inference_ms:
            self._last_inference_ms = now_ms

    def attach_latency(self, recorder: LatencyRecorder) -> None:
        """Also feed every successful request to ``recorder`` (summaries, histogram)."""
        self._latency = recorder

    @property
    def latency(self) -> LatencyRecorder | None:
        """The latency recorder (--metrics-config summaries or histograms), if any."""
        return self._latency

    # ----------------------------------------------------------------- read-only counters

    @property
    def success_count(self) -> int:
        """Requests answered successfully."""
        return self._success_count

    @property
    def request_ns(self) -> int:
        """Summed end-to-end duration of the successful requests."""
        return self._success_ns

    @property
    def failure_count(self) -> int:
        """Requests that failed, all reasons together."""
        return self._failure_count

    @property
    def failure_ns(self) -> int:
        """Summed duration of the failed requests."""
        return self._failure_ns

    def failures_by_reason(self) -> dict[str, int]:
        """A copy of the failure counts per reason; every reason of FAILURE_REASONS is present."""
        return dict(self._failure_by_reason)

    @property
    def queue_ns(self) -> int:
        """Summed queue wait of the successful requests."""
        return self._queue_ns

    @property
    def compute_input_ns(self) -> int:
        return self._compute_input_ns

    @property
    def compute_infer_ns(self) -> int:
        return self._compute_infer_ns

    @property
    def compute_output_ns(self) -> int:
        return self._compute_output_ns

    @property
    def cache_hit_count(self) -> int:
        """Requests answered from the response cache (included in ``success_count``)."""
        return self._cache_hit_count

    @property
    def cache_hit_ns(self) -> int:
        return self._cache_hit_ns

    @property
    def cache_miss_count(self) -> int:
        return self._cache_miss_count

    @property
    def cache_miss_ns(self) -> int:
        return self._cache_miss_ns

    @property
    def inference_count(self) -> int:
        """Inferences performed (a batch of n counts n)."""
        return self._inference_count

    @property
    def execution_count(self) -> int:
        """Batches executed."""
        return self._execution_count

    @property
    def last_inference_ms(self) -> int:
        """Milliseconds since the epoch of the last execution; 0 if none yet."""
        return self._last_inference_ms

    def batch_size_counts(self) -> dict[int, int]:
        """Executions per batch size (a copy), for the batch-size histogram."""
        return {size: stats.count for size, stats in list(self._batch_stats.items())}

    def batch_stats(self) -> dict[int, BatchStats]:
        """Per batch size totals (copies, safe to keep)."""
        return {size: replace(stats) for size, stats in list(self._batch_stats.items())}

    # ----------------------------------------------------------------- protocol output

    def to_proto(self, name: str, version: str) -> pb.ModelStatistics:
        """This model version's statistics as Triton's ``inference.ModelStatistics``."""
        out = pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=self._last_inference_ms,
            inference_count=self._inference_count,
            execution_count=self._execution_count,
        )
        infer = out.inference_stats
        successes = self._success_count
        _set(infer.success, successes, self._success_ns)
        _set(infer.fail, self._failure_count, self._failure_ns)
        _set(infer.queue, successes, self._queue_ns)
        computed = successes - self._cache_hit_count
        _set(infer.compute_input, computed, self._compute_input_ns)
        _set(infer.compute_infer, computed, self._compute_infer_ns)
        _set(infer.compute_output, computed, self._compute_output_ns)
        _set(infer.cache_hit, self._cache_hit_count, self._cache_hit_ns)
        _set(infer.cache_miss, self._cache_miss_count, self._cache_miss_ns)
        for size, stats in sorted(self._batch_stats.items()):
            batch = out.batch_stats.add(batch_size=size)
            _set(batch.compute_input, stats.count, stats.compute_input_ns)
            _set(batch.compute_infer, stats.count, stats.compute_infer_ns)
            _set(batch.compute_output, stats.count, stats.compute_output_ns)
        return out


def _set(duration: pb.StatisticDuration, count: int, ns: int) -> None:
    duration.count = count
    duration.ns = ns


def statistics_response(
    entries: Mapping[tuple[str, str], ModelStats],
) -> pb.ModelStatisticsResponse:
    """A ModelStatisticsResponse over ``{(model, version): stats}``, sorted by model and version."""
    response = pb.ModelStatisticsResponse()
    for name, version in sorted(entries, key=_model_version_key):
        response.model_stats.append(entries[(name, version)].to_proto(name, version))
    return response


def _model_version_key(key: tuple[str, str]) -> tuple[str, bool, int, str]:
    name, version = key
    numeric = version.isdigit()
    return name, not numeric, int(version) if numeric else 0, version
