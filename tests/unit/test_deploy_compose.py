"""deploy/ as Docker Compose runs it (the Dockerfile, the compose file, the gateway's Envoy
bootstrap) agrees with the code it deploys: every deploy file parses, every command parses with
its module's real parser, every environment variable is one the code reads, and ports and health
checks point where the processes listen. Nothing here builds an image; envoy and the compose
schema validator are used where installed. The Kubernetes manifests: test_deploy_kubernetes.py;
Prometheus and Grafana: test_deploy_monitoring.py.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import tomllib

import pytest

from tests.deploy_support import (
    BOOTSTRAP,
    BOOTSTRAP_IN_IMAGE,
    COMPOSE,
    DEPLOY,
    ROOT,
    bootstrap_listener,
    code_dirs_of,
    compose_file,
    compose_launches,
    env_names_read_by,
    k8s_launches,
    load_yaml,
    load_yaml_all,
    parse_launch,
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
