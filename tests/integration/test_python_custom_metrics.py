"""A Triton model.py with custom metrics (pb_utils.MetricFamily / Metric) served unchanged: its
families show on the Python service's /metrics next to the Triton ones, with exact values, and
unloading the model removes them while reloading brings them back from zero."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from services.python.runtime import PythonRuntime
from tests.support import ServerThread, settings_for

MODEL = "metrics_python"

CONFIG = f"""name: "{MODEL}"
backend: "python"
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

# written as a Triton user writes it (Triton's README example and its QA model's calls)
MODEL_PY = """
import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.requests_family = pb_utils.MetricFamily(
            name="custom_requests",
            description="Requests executed by the model",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.requests = self.requests_family.Metric(labels=labels)
        self.last_sum_family = pb_utils.MetricFamily(
            name="custom_last_sum",
            description="Sum of the last request's input",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.last_sum = self.last_sum_family.Metric(labels=labels)
        self.sizes_family = pb_utils.MetricFamily(
            name="custom_input_size",
            description="Elements per request",
            kind=pb_utils.MetricFamily.HISTOGRAM,
        )
        self.sizes = self.sizes_family.Metric(labels=labels, buckets=[1.0, 2.0, 4.0])
        try:
            self.requests.set(5.0)
            refused = 0.0
        except pb_utils.TritonModelException:
            refused = 1.0
        self.refused_family = pb_utils.MetricFamily(
            name="custom_counter_set_refused",
            description="1 when setting a counter raised TritonModelException",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.refused = self.refused_family.Metric()
        self.refused.set(refused)

    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            self.requests.increment(1)
            self.last_sum.set(float(data.sum()))
            self.sizes.observe(data.size)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return responses
"""


@pytest.fixture
def metrics_server(tmp_path: Path) -> Iterator[ServerThread]:
    version = tmp_path / MODEL / "1"
    version.mkdir(parents=True)
    (tmp_path / MODEL / "config.pbtxt").write_text(CONFIG)
    (version / "model.py").write_text(MODEL_PY)
    settings = settings_for(tmp_path, model_control_mode="explicit", startup_models=(MODEL,))
    with ServerThread(settings, [PythonRuntime]) as server:
        yield server


def _infer(server: ServerThread, *arrays: list[float]) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for values in arrays:
            data = np.array(values, np.float32)
            inp = grpcclient.InferInput("INPUT0", [len(values)], "FP32")
            inp.set_data_from_numpy(data)
            result = client.infer(MODEL, [inp])
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def _scrape(server: ServerThread) -> list[str]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text: str = response.read().decode()
    list(text_string_to_metric_families(text))  # the whole page stays valid exposition text
    return text.splitlines()


LABELS = f'model="{MODEL}",version="1"'


def _custom_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("custom_", "# TYPE custom_"))]


def test_custom_metrics_are_served_with_exact_values_and_follow_unload_and_reload(
    metrics_server: ServerThread,
) -> None:
    _infer(metrics_server, [1, 2, 3, 4], [0.5], [1, 1], [2, 2, 2, 2, 2])
    lines = _scrape(metrics_server)
    assert f"nv_inference_request_success{{{LABELS}}} 4" in lines  # the Triton families stay
    assert "# HELP custom_requests Requests executed by the model" in lines
    assert _custom_lines(lines) == [
        "# TYPE custom_requests counter",
        f"custom_requests{{{LABELS}}} 4",
        "# TYPE custom_last_sum gauge",
        f"custom_last_sum{{{LABELS}}} 10",
        "# TYPE custom_input_size histogram",
        f"custom_input_size_count{{{LABELS}}} 4",
        f"custom_input_size_sum{{{LABELS}}} 12",
        f'custom_input_size_bucket{{{LABELS},le="1"}} 1',
        f'custom_input_size_bucket{{{LABELS},le="2"}} 2',
        f'custom_input_size_bucket{{{LABELS},le="4"}} 3',
        f'custom_input_size_bucket{{{LABELS},le="+Inf"}} 4',
        "# TYPE custom_counter_set_refused gauge",
        "custom_counter_set_refused 1",
    ]

    with grpcclient.InferenceServerClient(metrics_server.grpc_url) as client:
        client.unload_model(MODEL)
        assert not client.is_model_ready(MODEL)
        assert _custom_lines(_scrape(metrics_server)) == []  # the model's objects are gone

        client.load_model(MODEL)
        assert client.is_model_ready(MODEL)
    assert f"custom_requests{{{LABELS}}} 0" in _scrape(metrics_server)  # re-created, from zero
    _infer(metrics_server, [3, 4])
    lines = _custom_lines(_scrape(metrics_server))
    assert f"custom_requests{{{LABELS}}} 1" in lines
    assert f"custom_last_sum{{{LABELS}}} 7" in lines
    assert f"custom_input_size_count{{{LABELS}}} 1" in lines
    assert f'custom_input_size_bucket{{{LABELS},le="2"}} 1' in lines
