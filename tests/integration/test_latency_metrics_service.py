"""--metrics-config on the real services: with summaries and histograms on, the metrics endpoint
carries Triton's summary families and the first-response histogram, their counts matching the
requests served; a decoupled model's histogram counts its first response (HTTP generate_stream);
counter_latencies=false drops the latency counters."""

from __future__ import annotations

import http.client
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from services.core.latency_metrics import MetricsConfig
from tests.support import ServerThread, settings_for

ALL_ON = MetricsConfig(counter_latencies=False, summary_latencies=True, histogram_latencies=True)


def _scrape(server: ServerThread) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        return r.read().decode()


def _value(text: str, name: str, model: str, quantile: str = "") -> float:
    extra = f',quantile="{quantile}"' if quantile else ""
    pattern = rf'^{name}\{{model="{model}"{extra},version="1"\}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"no {name} for {model} in the metrics"
    return float(found.group(1))


@pytest.fixture(scope="module")
def onnx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    from examples.build_repository import build_repository
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path_factory.mktemp("latency_onnx")
    build_repository(root, ["simple"])
    with ServerThread(settings_for(root, metrics_config=ALL_ON), [OnnxRuntime]) as server:
        yield server


def test_summaries_and_histogram_count_every_request(onnx: ServerThread) -> None:
    with grpcclient.InferenceServerClient(onnx.grpc_url) as c:
        for _ in range(5):
            tensors = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            for t in tensors:
                t.set_data_from_numpy(np.ones((1, 16), np.int32))
            c.infer("simple", tensors)
        successes = c.get_inference_statistics("simple").model_stats[0].inference_stats.success
    text = _scrape(onnx)
    for kind in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
        name = f"nv_inference_{kind}_summary_us"
        assert f"# TYPE {name} summary" in text
        assert _value(text, f"{name}_count", "simple") == successes.count == 5
    p99 = _value(text, "nv_inference_request_summary_us", "simple", "0.99")
    total_us = _value(text, "nv_inference_request_summary_us_sum", "simple")
    assert 0 < p99 <= total_us <= successes.ns / 1000 + 1
    assert _value(text, "nv_inference_first_response_histogram_ms_count", "simple") == 5
    assert "nv_inference_request_duration_us{" not in text  # counter_latencies=false


def test_a_decoupled_models_histogram_counts_its_first_response(tmp_path: Path) -> None:
    from examples.build_python import build_python_repository
    from services.python.runtime import PythonRuntime

    build_python_repository(tmp_path, ["repeat_python"])
    config = MetricsConfig(histogram_latencies=True)
    with ServerThread(settings_for(tmp_path, metrics_config=config), [PythonRuntime]) as server:
        host, port = server.http_url.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = json.dumps({"IN": [1, 2, 3], "DELAY_MS": 300})
        conn.request("POST", "/v2/models/repeat_python/generate_stream", body)
        events = conn.getresponse().read().count(b"data: ")
        conn.close()
        text = _scrape(server)
    assert events == 3
    assert _value(text, "nv_inference_first_response_histogram_ms_count", "repeat_python") == 1
    # the first of three responses 300 ms apart: well before the stream's end (~900 ms)
    assert _value(text, "nv_inference_first_response_histogram_ms_sum", "repeat_python") < 600
    assert "nv_inference_request_duration_us{" in text  # counters stay on by default
