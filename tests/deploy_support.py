"""Readers for the deployment artifacts under deploy/, shared by the tests that check them.

``tests/unit/test_deploy_*.py`` check the files against the code statically;
``tests/integration/test_deploy_metrics_names.py`` checks the metric names they use against
a real service's and a real Envoy's /metrics pages. Both read the files through here, and parse
the commands the files run with the real argument parsers of the modules they name.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
BOOTSTRAP = DEPLOY / "envoy" / "bootstrap.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "meshserve.json"
K8S = DEPLOY / "k8s"
#: the image deploy/docker/Dockerfile builds, as compose and the manifests name it
IMAGE = "meshserve:0.1.0"
#: where the Dockerfile puts deploy/envoy/bootstrap.yaml
BOOTSTRAP_IN_IMAGE = "/etc/meshserve/envoy.yaml"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return parse_yaml_all(path.read_text())


def parse_yaml_all(text: str) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def dump_yaml(doc: Any) -> str:
    return str(yaml.safe_dump(doc))


# ---- commands ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """One meshserve process a deployment file starts: where, its argv and its environment."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def module(self) -> str:
        """The module of ``python -m MODULE``, or the program (e.g. ``envoy``)."""
        return self.argv[2] if self.argv[:2] == ["python", "-m"] else self.argv[0]

    @property
    def args(self) -> list[str]:
        return self.argv[3:] if self.argv[:2] == ["python", "-m"] else self.argv[1:]


def parse_launch(launch: Launch, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings the real parser of ``launch.module`` makes of its arguments (argparse exits,
    failing the test, on an unknown flag or a bad value). Starts nothing."""
    module, args = launch.module, launch.args
    if module.startswith("services."):
        family = module.split(".", 1)[1]
        assert importlib.util.find_spec(f"{module}.__main__") is not None, (
            f"{launch.where}: no {module}"
        )
        main_source = (ROOT / "services" / family / "__main__.py").read_text()
        assert "run_service(" in main_source, f"{module} does not start through run_service"
        from services.core.settings import settings_from_args

        return settings_from_args(args, f"python -m {module}", family)
    if module == "control_plane":
        from control_plane.__main__ import settings_from_args as control_plane_settings

        return control_plane_settings(args)
    if module == "examples.build_repository":
        from examples import build_repository as builder

        roots: list[Path] = []
        monkeypatch.setattr(builder, "build_repository", lambda root, models: roots.append(root))
        monkeypatch.setattr(builder, "_other_families", lambda root: [])
        assert builder.main(args) == 0
        return roots[0]
    raise AssertionError(f"{launch.where}: no parser known for {launch.argv}")


def env_names_read_by(package_dirs: list[Path]) -> set[str]:
    """Upper-case string constants in the code of ``package_dirs`` (environment variable names
    are written as such), plus every variable the OpenTelemetry SDK reads."""
    from opentelemetry.sdk import environment_variables as otel_env

    names = {v for k, v in vars(otel_env).items() if k.startswith("OTEL_") and isinstance(v, str)}
    for directory in package_dirs:
        for path in directory.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                value = node.value if isinstance(node, ast.Constant) else None
                if isinstance(value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", value):
                    names.add(value)
    return names


def code_dirs_of(module: str) -> list[Path]:
    """The packages whose code a ``python -m module`` process runs (its own and the core kit)."""
    top = ROOT / module.split(".")[0]
    if module.startswith("services."):
        return [ROOT / "services" / module.split(".")[1], ROOT / "services" / "core"]
    return [top, ROOT / "services" / "core"] if module == "control_plane" else [top]


# ---- compose and Kubernetes ----------------------------------------------------------------
def compose_file() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(COMPOSE)
    return doc


def compose_launches() -> dict[str, Launch]:
    return {
        name: Launch(f"compose:{name}", svc["command"], svc.get("environment", {}))
        for name, svc in compose_file()["services"].items()
        if svc.get("image") == IMAGE
    }


def k8s_manifests() -> list[dict[str, Any]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in load_yaml_all(K8S / name)]


def k8s_pods() -> list[tuple[str, dict[str, Any]]]:
    """(workload name, pod template) of every Deployment and Job."""
    return [
        (m["metadata"]["name"], m["spec"]["template"])
        for m in k8s_manifests()
        if m["kind"] in ("Deployment", "Job")
    ]


def _k8s_launch(workload: str, container: dict[str, Any]) -> Launch:
    """The container's argv, with ``$(VAR)`` expanded as the kubelet does (a pod IP for
    status.podIP); a reference to an undefined variable fails."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        field = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[e["name"]] = "10.1.2.3" if field == "status.podIP" else e.get("value", "")
    argv = []
    for arg in [*container["command"], *container.get("args", [])]:
        for ref in re.findall(r"\$\((\w+)\)", arg):
            assert ref in env, f"{workload}/{container['name']}: $({ref}) is not in its env"
            arg = arg.replace(f"$({ref})", env[ref])
        argv.append(arg)
    return Launch(f"k8s:{workload}/{container['name']}", argv, env)


def k8s_launches() -> list[tuple[Launch, dict[str, Any], dict[str, Any]]]:
    """(launch, container, pod template) of every meshserve container of the manifests."""
    return [
        (_k8s_launch(name, c), c, pod)
        for name, pod in k8s_pods()
        for c in pod["spec"]["containers"]
        if c["image"] == IMAGE
    ]


def bootstrap_listener() -> tuple[int, set[str]]:
    """Port and route paths of the bootstrap's own (metrics) listener."""
    (listener,) = load_yaml(BOOTSTRAP)["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    paths = {
        r["match"]["path"] for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]
    }
    return listener["address"]["socket_address"]["port_value"], paths


def served_paths(module: str) -> set[str]:
    """GET paths the HTTP app of a framework service or of the control plane's front serves."""
    if module == "control_plane":
        from control_plane.front_http import build_front_app
        from control_plane.model import MeshState

        app = build_front_app(lambda: MeshState())
    else:
        from services.core.dataplane import DataPlane
        from services.core.http_app import build_http_app
        from services.core.manager import ModelManager
        from services.core.settings import ServerSettings

        manager = ModelManager(ServerSettings(model_repository=Path("/models")), [])
        app = build_http_app(DataPlane(manager))
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


# ---- PromQL -----------------------------------------------------------------------------------
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
_KEYWORDS |= {"unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression selects."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    bare = re.sub(r"\{[^}]*\}", " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = _GROUPING.sub(" ", bare)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
        if bare[m.end() :].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue  # a function, an aggregation or a keyword
        names.add(m.group())
    return names


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names matched) of each ``name{...}`` selector in ``expr``."""
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        yield m.group(1), set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))


def grouping_labels(expr: str) -> set[str]:
    """Label names of every ``by (...)`` / ``on (...)`` / ... clause."""
    return {x.strip() for m in _GROUPING.finditer(expr) for x in m.group(1).split(",") if x.strip()}


# ---- Prometheus rules and the Grafana dashboard -------------------------------------------------
def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def template_metrics() -> list[tuple[str, str]]:
    """(metric, label) of each templating variable's ``label_values(metric{...}, label)``."""
    found = []
    for var in dashboard()["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(
            r"label_values\(\s*([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)", query
        )
        assert m, f"variable {var['name']}: {query!r} is not label_values(metric, label)"
        found.append((m.group(1), m.group(2)))
    return found


def used_exprs() -> list[str]:
    """Every PromQL expression of the rules and the dashboard."""
    return [rule["expr"] for rule in rules()] + dashboard_exprs()


#: labels Prometheus itself attaches to every scraped series (target labels), not the exporter
TARGET_LABELS = {"job", "instance", "family", "pod"}
