"""deploy/ against real processes: the metrics its rules and dashboard use, and its probes.

The deployment's gateway topology runs here on one machine: the control plane with compose's
command line (listening on 0.0.0.0; its ports moved to free ones), Envoy with
deploy/envoy/bootstrap.yaml (ADS on 127.0.0.1, admin on loopback, :8002 metrics listener; ports
moved likewise) and a real ONNX service registered with it. Every metric name and label the
Prometheus rules and the Grafana dashboard use must be on the service's or Envoy's /metrics page.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.deploy_support import (
    BOOTSTRAP,
    BOOTSTRAP_IN_IMAGE,
    COMPOSE,
    TARGET_LABELS,
    dashboard_exprs,
    dump_yaml,
    grouping_labels,
    load_yaml,
    metric_names,
    recorded_names,
    selectors,
    template_metrics,
    used_exprs,
)
from tests.support import ServerThread, settings_for

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _labels_by_name(text: str) -> dict[str, set[str]]:
    """Sample name → label names seen on it, from a Prometheus text page."""
    found: dict[str, set[str]] = defaultdict(set)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            found[m.group(1)] |= set(re.findall(r'([a-zA-Z_]\w*)="', m.group(2) or ""))
    return found


@dataclass
class Gateway:
    http_port: int
    grpc_port: int
    metrics_port: int
    front_http_port: int
    service: ServerThread


def _bootstrap_with(ports: dict[int, int], path: Path) -> Path:
    """deploy/envoy/bootstrap.yaml with its port numbers moved (``ports``: old → new)."""

    def move(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ports.get(v, v) if k == "port_value" else move(v) for k, v in node.items()}
        return [move(x) for x in node] if isinstance(node, list) else node

    path.write_text(dump_yaml(move(load_yaml(BOOTSTRAP))))
    return path


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from examples.build_repository import build_repository
    from gateway.launcher import GatewayError, find_envoy
    from services.core.latency_metrics import MetricsConfig
    from services.onnx.runtime import OnnxRuntime

    try:
        envoy = find_envoy()
    except GatewayError as exc:
        pytest.skip(str(exc))
    tmp = tmp_path_factory.mktemp("deploy")
    build_repository(tmp / "models", ["simple"])
    ports = {p: _free_port() for p in (8000, 8001, 8002, 8010, 8011, 8012, 9901)}
    services = load_yaml(COMPOSE)["services"]
    cp_args = [
        str(ports.get(int(a), a)) if a.isdigit() else a
        for a in services["control-plane"]["command"][3:]
    ]
    for flag, file in (("--policy-file", "policies.json"), ("--registry-file", "registry.json")):
        cp_args[cp_args.index(flag) + 1] = str(tmp / file)
    envoy_args = [
        str(_bootstrap_with(ports, tmp / "envoy.yaml")) if a == BOOTSTRAP_IN_IMAGE else a
        for a in services["gateway"]["command"][1:]
    ]
    procs = [
        subprocess.Popen([sys.executable, "-m", "control_plane", *cp_args]),
        subprocess.Popen([str(envoy), *envoy_args, "--use-dynamic-base-id"]),
    ]
    service = None
    try:
        service = ServerThread(
            settings_for(
                tmp / "models",
                control_plane=f"127.0.0.1:{ports[8010]}",
                family="onnx",
                # the dashboard's percentile panels read the summaries and the histogram
                metrics_config=MetricsConfig(summary_latencies=True, histogram_latencies=True),
            ),
            [OnnxRuntime],
        ).start()
        yield Gateway(ports[8000], ports[8001], ports[8002], ports[8012], service)
    finally:
        if service is not None:
            service.stop()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _infer_through(gw: Gateway, within_s: float = 60) -> None:
    """gRPC and REST inferences of ``simple`` through the gateway, once its route is in place."""
    data = np.arange(16, dtype=np.int32).reshape(1, 16)
    deadline = time.monotonic() + within_s
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{gw.grpc_port}")
    try:
        while True:
            inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            for i in inputs:
                i.set_data_from_numpy(data)
            try:
                client.infer("simple", inputs)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        for _ in range(3):
            client.infer("simple", inputs)
    finally:
        client.close()
    rest = httpclient.InferenceServerClient(f"127.0.0.1:{gw.http_port}")
    try:
        inputs_http = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        for i in inputs_http:
            i.set_data_from_numpy(data)
        rest.infer("simple", inputs_http)
    finally:
        rest.close()


def test_rules_and_dashboard_metrics_are_on_real_metrics_pages(gateway: Gateway) -> None:
    _infer_through(gateway)
    _, service_page = _get(gateway.service.metrics_url)
    status, envoy_page = _get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
    assert status == 200
    labels = _labels_by_name(service_page) | _labels_by_name(envoy_page)
    recorded = recorded_names()
    for expr in used_exprs():
        names = metric_names(expr) - recorded - {"up"}
        missing = names - set(labels)
        assert not missing, f"{sorted(missing)} (in {expr!r}) are on no /metrics page"
        for name, matched in selectors(expr):
            if name in labels:
                assert matched - TARGET_LABELS <= labels[name], f"{name}{{{matched}}} in {expr!r}"
        known = set().union(*(labels[n] for n in names)) | TARGET_LABELS if names else set()
        assert not names or grouping_labels(expr) <= known, expr
    for metric, label in template_metrics():
        assert label in labels[metric], f"label_values({metric}, {label})"


def test_dashboard_envoy_selectors_match_the_gateways_clusters(gateway: Gateway) -> None:
    _infer_through(gateway)
    _, envoy_page = _get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
    clusters = set(re.findall(r'envoy_cluster_name="([^"]+)"', envoy_page))
    patterns = {
        m.group(1)
        for expr in dashboard_exprs()
        for m in re.finditer(r'envoy_cluster_name=~"([^"]+)"', expr)
    }
    assert patterns
    for pattern in patterns:
        chosen = re.compile(pattern.replace("$model", "simple"))
        assert {c for c in clusters if chosen.fullmatch(c)} == {
            "model_simple_1",
            "model-http_simple_1",
        }


def test_probe_endpoints_answer(gateway: Gateway) -> None:
    """The paths deploy/'s probes and health checks use, on the real processes."""
    _infer_through(gateway)
    assert _get(f"http://127.0.0.1:{gateway.metrics_port}/ready") == (200, "LIVE\n")
    assert _get(f"http://127.0.0.1:{gateway.front_http_port}/v2/health/live")[0] == 200
    # the front, reached by Envoy at the control plane's 0.0.0.0 address
    assert _get(f"http://127.0.0.1:{gateway.http_port}/v2/health/ready")[0] == 200
    service = gateway.service
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert _get(f"http://{service.http_url}{path}")[0] == 200, path
