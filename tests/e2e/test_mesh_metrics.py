"""The mesh's metrics port: a real Prometheus scrapes the merged exposition (every service's
families once, each sample labelled with its service, plus Envoy's stats) and sees the counts of
requests that went through the gateway."""

from __future__ import annotations

from pathlib import Path

import tritonclient.grpc as grpcclient

from tests.e2e.conftest import make_repository, running_mesh
from tests.e2e.traffic import simple_inputs
from tests.prometheus_support import needs_prometheus, prometheus_scraping


@needs_prometheus
def test_prometheus_scrapes_the_whole_mesh(example_repo: Path, tmp_path: Path) -> None:
    repo = make_repository(example_repo, tmp_path / "models", ["simple", "simple_string"])
    with running_mesh(repo, tmp_path) as mesh:
        client = grpcclient.InferenceServerClient(mesh.grpc_url)
        try:
            inputs, _ = simple_inputs()
            for _ in range(5):
                client.infer("simple", inputs)
        finally:
            client.close()
        target = f"127.0.0.1:{mesh.settings.metrics_port}"
        with prometheus_scraping([target], tmp_path / "prom") as prom:
            targets = prom.targets_healthy()
            assert targets[0]["lastError"] == ""
            prom.wait_value('nv_inference_count{model="simple",version="1"}', 5)
            series = prom.api("/api/v1/series", **{"match[]": 'nv_inference_count{model="simple"}'})
            assert series and all(s["service"].startswith("onnx-") for s in series)
            # Envoy's own stats come through the same port
            prom.wait_value(
                'envoy_cluster_upstream_rq_total{envoy_cluster_name="model_simple_1"}', 5
            )
