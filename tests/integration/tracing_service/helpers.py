"""Helpers for the tracing tests: a client's traceparent, requests, and finding spans.

Nothing sleeps: ``wait_trace`` flushes the exporter, then polls the receiver with a deadline.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from services.core.tracing_sdk import TraceControl
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

SERVICE_NAME = "meshserve-tracing-test"
INFER = "inference.GRPCInferenceService/ModelInfer"


def traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent of a client span: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def simple_inputs(rows: int = 1, module: Any = grpcclient) -> list[Any]:
    a = np.arange(16 * rows, dtype=np.int32).reshape(rows, 16)
    inputs = [module.InferInput(n, [rows, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for item in inputs:
        item.set_data_from_numpy(a)
    return inputs


def one(spans: list[ReceivedSpan], name: str, **where: str) -> ReceivedSpan:
    found = [
        s
        for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in where.items())
    ]
    assert len(found) == 1, f"expected one '{name}' span {where}, got {found}"
    return found[0]


def wait_trace(
    receiver: OtlpReceiver, control: TraceControl, trace_id: str, names: list[str]
) -> list[ReceivedSpan]:
    """The trace's spans once every name in ``names`` arrived (as many times as listed)."""

    def complete(spans: list[ReceivedSpan]) -> bool:
        got = [s.name for s in spans if s.trace_id == trace_id]
        return all(got.count(n) >= names.count(n) for n in names)

    spans = receiver.wait_for(complete, 10, f"trace {trace_id} with {names}", control.flush)
    return [s for s in spans if s.trace_id == trace_id]


def assert_within(child: ReceivedSpan, parent: ReceivedSpan, slack_ns: int = 1_000_000) -> None:
    assert parent.start_ns - slack_ns <= child.start_ns <= child.end_ns
    assert child.end_ns <= parent.end_ns + slack_ns
