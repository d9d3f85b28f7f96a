"""A real Prometheus scrapes one service's metrics endpoint and sees our counts and Triton's
host CPU metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from services.core.host_metrics import read_memory
from tests.prometheus_support import needs_prometheus, prometheus_scraping
from tests.support import ServerThread


@needs_prometheus
def test_prometheus_scrapes_service_metrics(onnx_server: ServerThread, tmp_path: Path) -> None:
    assert onnx_server.running is not None
    target = f"127.0.0.1:{onnx_server.running.metrics_port}"
    client = grpcclient.InferenceServerClient(onnx_server.grpc_url)
    try:
        before = client.get_inference_statistics("simple_identity", as_json=True)["model_stats"][0]
        done = int(before.get("inference_count", 0))
        executions = int(before.get("execution_count", 0))
        data = np.array([[b"a", b"b"]], dtype=object)
        inp = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
        inp.set_data_from_numpy(data)
        for _ in range(4):
            client.infer("simple_identity", [inp])
    finally:
        client.close()
    with prometheus_scraping([target], tmp_path) as prom:
        targets = prom.targets_healthy()
        assert targets[0]["lastError"] == ""
        labels = 'model="simple_identity",version="1"'
        prom.wait_value(f"nv_inference_count{{{labels}}}", done + 4)
        prom.wait_value(f"nv_inference_request_success{{{labels}}}", done + 4)
        prom.wait_value(f'nv_inference_request_failure{{{labels},reason="REJECTED"}}', 0)
        prom.wait_value(f'nv_inference_batch_size_bucket{{{labels},le="+Inf"}}', executions + 4)
        # Triton's host CPU metrics: the memory total is this machine's
        total = read_memory(Path("/proc/meminfo").read_text())[0]
        prom.wait_value("nv_cpu_memory_total_bytes", total)
        prom.wait_value("nv_cpu_utilization <= bool 1", 1)
