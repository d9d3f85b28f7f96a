"""ModelStats: Triton's statistics semantics, per-batch-size totals, proto output."""

from __future__ import annotations

import pytest

from protos.gen.inference import grpc_service_pb2 as pb
from services.core.errors import InternalError, QueueFull, QueueTimeout
from services.core.statistics import FAILURE_REASONS, ModelStats, statistics_response

_MS = 1_000_000


class FakeWallClock:
    """A settable wall clock (ns since the epoch)."""

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


def _success(stats: ModelStats, scale: int = 1) -> None:
    stats.record_request_success(
        request_ns=1000 * scale,
        queue_ns=100 * scale,
        compute_input_ns=10 * scale,
        compute_infer_ns=500 * scale,
        compute_output_ns=20 * scale,
    )


def _execute(stats: ModelStats, batch_size: int, infer_ns: int = 400) -> None:
    stats.record_execution(
        batch_size=batch_size,
        inference_count=batch_size,
        compute_input_ns=5,
        compute_infer_ns=infer_ns,
        compute_output_ns=7,
    )


def test_fresh_stats_are_zero() -> None:
    stats = ModelStats()
    assert stats.success_count == stats.failure_count == 0
    assert stats.execution_count == stats.inference_count == 0
    assert stats.last_inference_ms == 0
    assert stats.failures_by_reason() == dict.fromkeys(FAILURE_REASONS, 0)
    assert stats.batch_size_counts() == {}


def test_successes_accumulate_per_request() -> None:
    stats = ModelStats()
    _success(stats)
    _success(stats, scale=2)
    assert stats.success_count == 2
    assert stats.request_ns == 3000
    assert stats.queue_ns == 300
    assert (stats.compute_input_ns, stats.compute_infer_ns, stats.compute_output_ns) == (
        30,
        1500,
        60,
    )


def test_failures_are_counted_per_reason_of_the_serving_error() -> None:
    stats = ModelStats()
    stats.record_request_failure(request_ns=10, reason=QueueFull.reason)
    stats.record_request_failure(request_ns=20, reason=QueueTimeout.reason)
    stats.record_request_failure(request_ns=30, reason=InternalError.reason)
    stats.record_request_failure(request_ns=40, reason="SOMETHING_NEW")
    assert stats.failure_count == 4
    assert stats.failure_ns == 100
    assert stats.failures_by_reason() == {
        "REJECTED": 1,
        "CANCELED": 1,
        "BACKEND": 1,
        "OTHER": 1,
    }
    assert stats.success_count == 0


def test_executions_fill_batch_stats_and_last_inference() -> None:
    clock = FakeWallClock(1_700_000_000_123 * _MS + 999)
    stats = ModelStats(wall_clock_ns=clock)
    _execute(stats, 4)
    _execute(stats, 4, infer_ns=600)
    clock.now_ns += 5 * _MS
    _execute(stats, 1)
    assert stats.execution_count == 3
    assert stats.inference_count == 9
    assert stats.batch_size_counts() == {4: 2, 1: 1}
    four = stats.batch_stats()[4]
    assert (four.count, four.compute_input_ns, four.compute_infer_ns, four.compute_output_ns) == (
        2,
        10,
        1000,
        14,
    )
    assert stats.last_inference_ms == 1_700_000_000_128


def test_last_inference_never_goes_back() -> None:
    clock = FakeWallClock(2000 * _MS)
    stats = ModelStats(wall_clock_ns=clock)
    _execute(stats, 1)
    clock.now_ns = 1000 * _MS
    _execute(stats, 1)
    assert stats.last_inference_ms == 2000


def test_batch_stats_are_copies() -> None:
    stats = ModelStats()
    _execute(stats, 2)
    stats.batch_stats()[2].count = 99
    stats.batch_size_counts()[2] = 99
    assert stats.batch_size_counts() == {2: 1}


def test_execution_needs_a_positive_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size >= 1"):
        _execute(ModelStats(), 0)


def test_to_proto_matches_tritons_layout() -> None:
    stats = ModelStats(wall_clock_ns=FakeWallClock(42 * _MS))
    _success(stats)
    _success(stats)
    stats.record_request_failure(request_ns=77, reason="REJECTED")
    _execute(stats, 8)
    _execute(stats, 2)
    _execute(stats, 8)

    proto = stats.to_proto("resnet", "3")

    assert isinstance(proto, pb.ModelStatistics)
    assert (proto.name, proto.version) == ("resnet", "3")
    assert proto.last_inference == 42
    assert proto.inference_count == 18
    assert proto.execution_count == 3
    infer = proto.inference_stats
    assert (infer.success.count, infer.success.ns) == (2, 2000)
    assert (infer.fail.count, infer.fail.ns) == (1, 77)
    assert (infer.queue.count, infer.queue.ns) == (2, 200)
    assert (infer.compute_input.count, infer.compute_input.ns) == (2, 20)
    assert (infer.compute_infer.count, infer.compute_infer.ns) == (2, 1000)
    assert (infer.compute_output.count, infer.compute_output.ns) == (2, 40)
    assert (infer.cache_hit.count, infer.cache_miss.count) == (0, 0)
    assert [b.batch_size for b in proto.batch_stats] == [2, 8]
    eight = proto.batch_stats[1]
    assert (eight.compute_input.count, eight.compute_input.ns) == (2, 10)
    assert (eight.compute_infer.count, eight.compute_infer.ns) == (2, 800)
    assert (eight.compute_output.count, eight.compute_output.ns) == (2, 14)


def test_statistics_response_orders_models_and_numeric_versions() -> None:
    entries = {
        ("b", "1"): ModelStats(),
        ("a", "10"): ModelStats(),
        ("a", "2"): ModelStats(),
    }
    response = statistics_response(entries)
    assert [(m.name, m.version) for m in response.model_stats] == [
        ("a", "2"),
        ("a", "10"),
        ("b", "1"),
    ]
