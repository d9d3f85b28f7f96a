"""deploy/k8s agrees with the code it deploys: the manifests follow the Kubernetes schemas, every
command parses with its module's real parser, every environment variable is one the code reads,
and probes, ports and Services point where the processes listen. Nothing here needs a cluster;
kubectl and the schema validator are used where installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

from tests.deploy_support import (
    K8S,
    Launch,
    bootstrap_listener,
    code_dirs_of,
    env_names_read_by,
    k8s_launches,
    k8s_manifests,
    k8s_pods,
    load_yaml,
    parse_launch,
    parse_yaml_all,
    served_paths,
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
