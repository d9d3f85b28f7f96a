"""Merging ModelStatistics from several replicas into one answer (the front's ModelStatistics).

Replicas of one model version are summed: counts, durations, per-batch-size statistics; the
latest last_inference wins.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import Message

from protos.gen.inference import grpc_service_pb2 as pb


def merge_statistics(
    responses: Sequence[pb.ModelStatisticsResponse],
) -> pb.ModelStatisticsResponse:
    """All entries sorted by (name, version); replicas of one version summed (last_inference:
    the latest; batch_stats by batch size; response_stats by key; memory_usage listed)."""
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    for response in responses:
        for stats in response.model_stats:
            key = (stats.name, stats.version)
            if key not in merged:
                merged[key] = pb.ModelStatistics()
                merged[key].CopyFrom(stats)
                continue
            into = merged[key]
            into.last_inference = max(into.last_inference, stats.last_inference)
            into.inference_count += stats.inference_count
            into.execution_count += stats.execution_count
            _add_durations(into.inference_stats, stats.inference_stats)
            sizes = {b.batch_size: b for b in into.batch_stats}
            for batch in stats.batch_stats:
                if batch.batch_size in sizes:
                    _add_durations(sizes[batch.batch_size], batch)
                else:
                    into.batch_stats.add().CopyFrom(batch)
            into.memory_usage.extend(stats.memory_usage)
            for rkey, rstats in stats.response_stats.items():
                _add_durations(into.response_stats[rkey], rstats)
    return pb.ModelStatisticsResponse(model_stats=[merged[k] for k in sorted(merged)])


def _add_durations(into: Message, other: Message) -> None:
    """Add every StatisticDuration field of ``other`` to ``into`` (same message type)."""
    for field in into.DESCRIPTOR.fields:
        if field.message_type is pb.StatisticDuration.DESCRIPTOR:
            dst, src = getattr(into, field.name), getattr(other, field.name)
            dst.count += src.count
            dst.ns += src.ns
