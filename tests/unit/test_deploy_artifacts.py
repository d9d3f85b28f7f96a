"""deploy/ (Dockerfile, compose, Kubernetes, Envoy bootstrap, Prometheus, Grafana) agrees with the
code it deploys: every command parses with its module's real parser, every environment variable
is one the code reads, ports and probes point where the processes listen, and every metric the
rules and the dashboard use is one meshserve exports. Nothing here builds an image or needs a
cluster; promtool, envoy, kubectl and the schema validators are used where installed.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_support import (
    BOOTSTRAP,
    BOOTSTRAP_IN_IMAGE,
    COMPOSE,
    DEPLOY,
    K8S,
    PROMETHEUS,
    ROOT,
    Launch,
    bootstrap_listener,
    code_dirs_of,
    compose_file,
    compose_launches,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    env_names_read_by,
    k8s_launches,
    k8s_manifests,
    k8s_pods,
    load_yaml,
    load_yaml_all,
    metric_names,
    parse_launch,
    parse_yaml_all,
    recorded_names,
    served_paths,
    template_metrics,
    used_exprs,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (Debian's prometheus) absent"
)


# ---- every file parses ------------------------------------------------------------------------
def test_every_deploy_file_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert len(files) >= 12, files
    for path in files:
        docs = [json.loads(path.read_text())] if path.suffix == ".json" else load_yaml_all(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


# ---- Dockerfile -------------------------------------------------------------------------------
def test_dockerfile_installs_what_pyproject_pins_and_copies_every_package() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    pins = dict(re.findall(r'"([a-z-]+)==([^"]+)"', text))
    pinned = dict(
        d.split("==")
        for d in project["dependencies"] + project["optional-dependencies"]["torch"]
        if "==" in d
    )
    assert pins and all(pinned.get(name) == version for name, version in pins.items()), pins
    extras = re.search(r"^ARG EXTRAS=(\S+)$", text, re.M)
    assert extras and set(extras.group(1).split(",")) <= set(project["optional-dependencies"])
    copied = {src for src, _ in re.findall(r"^COPY (\S+) (\S+)$", text, re.M)}
    assert all((ROOT / src).exists() for src in copied), copied
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    assert {i.rstrip("*") for i in includes} <= copied
    assert f"COPY deploy/envoy/bootstrap.yaml {BOOTSTRAP_IN_IMAGE}" in text
    ignored = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "examples/models"} <= set(ignored)


# ---- the gateway's bootstrap ------------------------------------------------------------------
def test_bootstrap_is_the_launchers_plus_a_metrics_listener() -> None:
    from gateway.bootstrap import bootstrap

    ours = load_yaml(BOOTSTRAP)
    built = bootstrap("127.0.0.1", 8010, 9901)
    for key in ("node", "admin", "dynamic_resources"):
        assert ours[key] == built[key], key
    clusters = {c["name"]: c for c in ours["static_resources"]["clusters"]}
    assert clusters["xds"] == built["static_resources"]["clusters"][0]
    admin = ours["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"  # the admin interface stays off the network
    admin_endpoint = clusters["envoy-admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert admin_endpoint["endpoint"]["address"]["socket_address"] == admin
    assert bootstrap_listener() == (8002, {"/metrics", "/ready"})


def test_envoy_accepts_the_gateway_commands() -> None:
    from gateway.launcher import GatewayError, find_envoy

    try:
        envoy = find_envoy()
    except GatewayError as exc:
        pytest.skip(str(exc))
    compose_gateway = compose_launches()["gateway"]
    k8s_gateways = [launch for launch, _, _ in k8s_launches() if launch.module == "envoy"]
    assert len(k8s_gateways) == 1
    for launch in (compose_gateway, *k8s_gateways):
        assert launch.argv[:3] == ["envoy", "-c", BOOTSTRAP_IN_IMAGE], launch.where
        args = [str(BOOTSTRAP) if a == BOOTSTRAP_IN_IMAGE else a for a in launch.args]
        run = subprocess.run(
            [str(envoy), "--mode", "validate", "--use-dynamic-base-id", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, f"{launch.where}: {run.stdout[-2000:]}{run.stderr[-2000:]}"


# ---- compose ----------------------------------------------------------------------------------
def test_compose_follows_the_compose_spec() -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is in the dev extra")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_compose_commands_parse_and_addresses_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = compose_file()
    services = compose["services"]
    launches = compose_launches()
    parsed = {
        name: parse_launch(launch, monkeypatch)
        for name, launch in launches.items()
        if launch.module != "envoy"
    }
    families = {"onnx", "torch", "tensorflow", "python", "ensemble"}
    assert {launches[n].module for n in parsed} >= {f"services.{f}" for f in families}
    (cp_name,) = [n for n in parsed if launches[n].module == "control_plane"]
    cp, cp_svc = parsed[cp_name], services[cp_name]
    # Envoy shares the control plane's network namespace: it binds the listeners the control
    # plane configures on its --host, and reaches ADS and the front there
    assert cp.host == "0.0.0.0"
    assert services["gateway"]["network_mode"] == f"service:{cp_name}"
    ads = load_yaml(BOOTSTRAP)["static_resources"]["clusters"][0]["load_assignment"]
    assert (
        ads["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
            "port_value"
        ]
        == cp.control_port
    )
    metrics_port, _ = bootstrap_listener()
    published = {int(p.split(":")[-1]) for p in cp_svc["ports"]}
    assert published == {cp.gateway_http_port, cp.gateway_grpc_port, metrics_port}
    assert f"{cp.front_http_port}/v2/health/live" in " ".join(cp_svc["healthcheck"]["test"])
    cp_names = {cp_name, *cp_svc["networks"]["mesh"]["aliases"]}

    ipam = compose["networks"]["mesh"]["ipam"]["config"][0]
    subnet, dynamic = ipaddress.ip_network(ipam["subnet"]), ipaddress.ip_network(ipam["ip_range"])
    (models_root,) = [
        v for n, v in parsed.items() if launches[n].module == "examples.build_repository"
    ]
    models_volume = next(
        v.split(":")[0]
        for v in services["models"]["volumes"]
        if v.split(":")[1] == str(models_root)
    )
    for name, s in parsed.items():
        if not launches[name].module.startswith("services."):
            continue
        # a service advertises its --host to Envoy, which takes IP addresses only: a fixed one
        address = ipaddress.ip_address(s.host)
        assert s.host == services[name]["networks"]["mesh"]["ipv4_address"], name
        assert address in subnet and address not in dynamic, name
        host, port = s.control_plane.rsplit(":", 1)
        assert host in cp_names and int(port) == cp.control_port, name
        assert f"{models_volume}:{s.model_repository}:ro" in services[name]["volumes"], name
        assert f":{s.http_port}/v2/health/ready" in " ".join(
            services[name]["healthcheck"]["test"]
        ), name
        gateway = launches[name].env.get("MESHSERVE_GATEWAY")
        if s.family in ("python", "ensemble"):
            assert gateway is not None, f"{name} calls the gateway but is not told where it is"
        if gateway is not None:
            host, port = gateway.rsplit(":", 1)
            assert host in cp_names and int(port) == cp.gateway_grpc_port, name
        xds = launches[name].env.get("MESHSERVE_XDS")
        if s.family == "ensemble":
            assert xds is not None, f"{name}: steps cannot follow the routes without the ADS"
        if xds is not None:  # the control plane's ADS shares its control port
            host, port = xds.rsplit(":", 1)
            assert host in cp_names and int(port) == cp.control_port, name


def test_compose_environment_is_read_by_the_code() -> None:
    for launch in compose_launches().values():
        known = env_names_read_by(code_dirs_of(launch.module))
        unknown = set(launch.env) - known
        assert not unknown, f"{launch.where} sets {unknown}, which {launch.module} never reads"


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
    """Every sample name a service's /metrics page has (from the real collector and renderer)."""
    from prometheus_client.registry import CollectorRegistry

    from services.core.metrics import ModelMetricsSource, TritonMetricsCollector, render_text
    from services.core.statistics import ModelStats

    registry = CollectorRegistry()
    registry.register(
        TritonMetricsCollector(lambda: [ModelMetricsSource("m", "1", ModelStats(), 0, 4)])
    )
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


# ---- Kubernetes -------------------------------------------------------------------------------
def test_kustomization_lists_every_manifest() -> None:
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_manifests_follow_the_kubernetes_schemas(version: str) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate.utils", reason="kubernetes-validate is in the dev extra"
    )
    for doc in k8s_manifests():
        kv.validate(doc, version, strict=True)  # raises on an unknown field or a wrong type


def test_kubectl_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    run = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    rendered = parse_yaml_all(run.stdout)
    assert len(rendered) == len(k8s_manifests())
    assert all(
        d["metadata"].get("namespace") == "meshserve" for d in rendered if d["kind"] != "Namespace"
    )


@dataclass(frozen=True)
class _Listening:
    """What one process listens on, as its parsed command line says."""

    ports: set[int]
    #: the HTTP port serving ``paths``
    http: int
    paths: set[str]
    #: the port answering grpc.health.v1, if any
    grpc_health: int | None = None


def _listening(launch: Launch, settings: Any, cp: Any) -> _Listening:
    metrics_port, envoy_paths = bootstrap_listener()
    if launch.module == "envoy":
        ports = {cp.gateway_http_port, cp.gateway_grpc_port, metrics_port}
        return _Listening(ports, metrics_port, envoy_paths)
    if launch.module == "control_plane":
        ports = {cp.control_port, cp.front_grpc_port, cp.front_http_port}
        return _Listening(ports, cp.front_http_port, served_paths("control_plane"))
    s = settings
    ports = {s.grpc_port, s.http_port, s.metrics_port}
    return _Listening(ports, s.http_port, served_paths(launch.module), s.grpc_port)


def _k8s_parsed(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], Any]:
    """Settings of every meshserve container (by ``Launch.where``), and the control plane's."""
    parsed = {
        launch.where: parse_launch(launch, monkeypatch)
        for launch, _, _ in k8s_launches()
        if launch.module != "envoy"
    }
    (cp,) = [
        parsed[launch.where] for launch, _, _ in k8s_launches() if launch.module == "control_plane"
    ]
    return parsed, cp


def test_k8s_probes_and_ports_are_what_the_processes_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed, cp = _k8s_parsed(monkeypatch)
    for launch, container, _ in k8s_launches():
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), launch.where
        if launch.module == "examples.build_repository":
            continue
        served = _listening(launch, parsed.get(launch.where), cp)
        named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert set(named.values()) <= served.ports, f"{launch.where} declares a port nothing serves"
        probes = [
            container[k]
            for k in ("startupProbe", "readinessProbe", "livenessProbe")
            if k in container
        ]
        assert "readinessProbe" in container, f"{launch.where}: no readiness probe"
        for probe in probes:
            kind = next(k for k in ("grpc", "httpGet", "tcpSocket") if k in probe)
            port = named.get(probe[kind]["port"], probe[kind]["port"])
            assert port in served.ports, f"{launch.where}: {kind} probe on {port}"
            if kind == "grpc":
                assert port == served.grpc_health, f"{launch.where}: no gRPC health on {port}"
            if kind == "httpGet":
                assert port == served.http, f"{launch.where}: HTTP probe on {port}"
                assert probe[kind]["path"] in served.paths, f"{launch.where}: {probe[kind]['path']}"


def test_k8s_services_advertise_their_pod_ip_and_reach_the_mesh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifests = k8s_manifests()
    k8s_services = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Service"}
    claims = {m["metadata"]["name"] for m in manifests if m["kind"] == "PersistentVolumeClaim"}
    parsed, cp = _k8s_parsed(monkeypatch)
    model_claims, families = set(), set()
    for launch, container, pod in k8s_launches():
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        annotations = pod["metadata"].get("annotations", {})
        if launch.module == "examples.build_repository":
            model_claims.add(
                volumes[mounts[str(parsed[launch.where])]]["persistentVolumeClaim"]["claimName"]
            )
        elif launch.module == "control_plane":  # Prometheus scrapes Envoy's metrics in this pod
            assert annotations["prometheus.io/port"] == str(bootstrap_listener()[0])
        elif launch.module.startswith("services."):
            s = parsed[launch.where]
            families.add(s.family)
            # Envoy takes endpoints as IP addresses only: bind and advertise the pod's
            assert s.host == "10.1.2.3", f"{launch.where}: does not bind its pod IP"
            named = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert named == {"http": s.http_port, "grpc": s.grpc_port, "metrics": s.metrics_port}
            assert annotations["prometheus.io/port"] == str(s.metrics_port), launch.where
            assert "grpc" in container["readinessProbe"], f"{launch.where}: not gRPC health"
            model_claims.add(
                volumes[mounts[str(s.model_repository)]]["persistentVolumeClaim"]["claimName"]
            )
            _assert_reaches(s.control_plane, k8s_services, "control", cp.control_port)
            if s.family in ("python", "ensemble"):
                gateway = launch.env["MESHSERVE_GATEWAY"]
                _assert_reaches(gateway, k8s_services, "grpc", cp.gateway_grpc_port)
            if s.family == "ensemble":
                _assert_reaches(
                    launch.env["MESHSERVE_XDS"], k8s_services, "control", cp.control_port
                )
    assert families == {"onnx", "torch", "tensorflow", "python", "ensemble"}
    assert len(model_claims) == 1 and model_claims <= claims, model_claims


def _assert_reaches(address: str, services: dict[str, Any], port_name: str, listening: int) -> None:
    """``host:port`` is a Service whose port leads to the container port named ``port_name``,
    which the process listens on (``listening``)."""
    host, port = address.rsplit(":", 1)
    assert host in services, f"{address}: no Service {host}"
    (service_port,) = [p for p in services[host]["spec"]["ports"] if p["port"] == int(port)]
    assert service_port["targetPort"] == port_name, address
    selector = services[host]["spec"]["selector"]
    pods = [pod for _, pod in k8s_pods() if selector.items() <= pod["metadata"]["labels"].items()]
    assert len(pods) == 1, f"Service {host} selects {len(pods)} workloads"
    declared = {
        p["name"]: p["containerPort"]
        for c in pods[0]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    assert declared[port_name] == listening, address


def test_k8s_services_select_one_workload_and_target_declared_ports() -> None:
    for m in k8s_manifests():
        if m["kind"] != "Service":
            continue
        selector = m["spec"]["selector"]
        pods = [
            pod for _, pod in k8s_pods() if selector.items() <= pod["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, m["metadata"]["name"]
        declared = {p["name"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in m["spec"]["ports"]} <= declared, m["metadata"]["name"]


def test_k8s_environment_is_read_by_the_code() -> None:
    for launch, container, _ in k8s_launches():
        used_in_args = set(
            re.findall(r"\$\((\w+)\)", " ".join(container["command"] + container.get("args", [])))
        )
        known = env_names_read_by(code_dirs_of(launch.module)) | used_in_args
        unknown = set(launch.env) - known
        assert not unknown, f"{launch.where} sets {unknown}, which {launch.module} never reads"
