"""deploy/prometheus and deploy/grafana agree with the code and with compose: promtool accepts
the config and the rules (and the rules' unit tests pass), Prometheus scrapes every metrics port
of compose, every metric the rules and the dashboard use is one meshserve exports, and Grafana's
provisioning points at compose's Prometheus and the dashboard. promtool is used where installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy_support import (
    DEPLOY,
    PROMETHEUS,
    bootstrap_listener,
    compose_file,
    compose_launches,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    load_yaml,
    metric_names,
    parse_launch,
    recorded_names,
    template_metrics,
    used_exprs,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian's prometheus) absent"
)


# ---- Prometheus -------------------------------------------------------------------------------
@needs_promtool
@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", str(PROMETHEUS)],
        ["check", "rules", str(PROMETHEUS.parent / "rules.yml")],
    ],
    ids=["config", "rules"],
)
def test_promtool_accepts(args: list[str]) -> None:
    run = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)  # type: ignore[list-item]
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    """deploy/prometheus/rules_test.yml: the alerts fire on failing / queueing series only."""
    run = subprocess.run(
        [PROMTOOL, "test", "rules", str(PROMETHEUS.parent / "rules_test.yml")],  # type: ignore[list-item]
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_prometheus_scrapes_every_metrics_port_of_compose(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose_file()["services"]
    targets = {
        t
        for job in load_yaml(PROMETHEUS)["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    expected = set()
    for name, launch in compose_launches().items():
        if launch.module.startswith("services."):
            expected.add(f"{name}:{parse_launch(launch, monkeypatch).metrics_port}")
        if launch.module == "control_plane":
            alias = (
                "gateway" if "gateway" in services[name]["networks"]["mesh"]["aliases"] else name
            )
            expected.add(f"{alias}:{bootstrap_listener()[0]}")
    assert targets == expected
    config_dir = Path(
        next(a for a in services["prometheus"]["command"] if a.startswith("--config.file=")).split(
            "="
        )[1]
    ).parent
    assert f"../prometheus:{config_dir}:ro" in services["prometheus"]["volumes"]


# ---- metric names -----------------------------------------------------------------------------
def _exported_names() -> set[str]:
    """Every sample name a service's /metrics page has (from the real collector and renderer),
    with the summaries and histograms of --metrics-config on and one request recorded."""
    from prometheus_client.registry import CollectorRegistry

    from protos.gen.inference import model_config_pb2 as mc
    from services.core.host_metrics import HostMetricsCollector
    from services.core.latency_metrics import LatencyRecorder, MetricsConfig
    from services.core.metrics import ModelMetricsSource, TritonMetricsCollector, render_text
    from services.core.statistics import ModelStats

    config = MetricsConfig(summary_latencies=True, histogram_latencies=True)
    stats = ModelStats()
    stats.attach_latency(LatencyRecorder(config, mc.ModelConfig(name="m")))
    stats.record_request_success(
        request_ns=1000, queue_ns=10, compute_input_ns=1, compute_infer_ns=900, compute_output_ns=1
    )
    registry = CollectorRegistry()
    registry.register(
        TritonMetricsCollector(lambda: [ModelMetricsSource("m", "1", stats, 0, 4)], config)
    )
    registry.register(HostMetricsCollector())  # as server.py adds it (--allow-cpu-metrics)
    text = render_text(registry).decode()
    return {
        re.split(r"[{ ]", line)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_rules_and_dashboard_use_only_metrics_meshserve_exports() -> None:
    exported, recorded = _exported_names(), recorded_names()
    used = {n for expr in used_exprs() for n in metric_names(expr)} | {
        m for m, _ in template_metrics()
    }
    assert {"nv_inference_request_success", "nv_inference_batch_size_bucket"} <= used
    for name in used:
        if name.startswith("nv_"):
            assert name in exported, f"{name} is not on a service's /metrics page"
        elif name.startswith("meshserve:"):
            assert name in recorded, f"{name} is recorded by no rule"
        else:  # Envoy's, checked against a real Envoy in tests/integration/test_deploy_metrics_names.py
            assert name.startswith("envoy_cluster_") or name == "up", name


def test_dashboard_shows_what_a_triton_user_looks_for() -> None:
    used = {n for expr in dashboard_exprs() for n in metric_names(expr)}
    for family in (
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_pending_request_count",
        "nv_inference_batch_size_bucket",
        "envoy_cluster_upstream_rq_time_bucket",
        "nv_inference_first_response_histogram_ms_bucket",
        "nv_inference_request_summary_us",
    ):
        assert family in used, family
    for expr in dashboard_exprs():  # a Triton duration counter only means something per request
        if "_duration_us" in expr:
            assert "/" in expr and "nv_inference_request_success" in expr, expr


# ---- Grafana ----------------------------------------------------------------------------------
def test_grafana_provisioning_agrees_with_compose_and_the_dashboard() -> None:
    grafana = DEPLOY / "grafana"
    (datasource,) = load_yaml(grafana / "provisioning" / "datasources" / "prometheus.yaml")[
        "datasources"
    ]
    (provider,) = load_yaml(grafana / "provisioning" / "dashboards" / "meshserve.yaml")["providers"]
    services = compose_file()["services"]
    listen = next(
        a for a in services["prometheus"]["command"] if a.startswith("--web.listen-address=")
    )
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://prometheus:{listen.rsplit(':', 1)[1]}"
    volumes = services["grafana"]["volumes"]
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in volumes
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        for ref in [p.get("datasource"), *(t.get("datasource") for t in p.get("targets", []))]:
            assert ref is None or ref["uid"] == datasource["uid"], p["title"]
    assert all(
        v["datasource"]["uid"] == datasource["uid"] for v in dashboard()["templating"]["list"]
    )
