"""`meshserve up --exit-on-error` with a model that cannot load: the service stops, so does the
whole mesh (no process left behind), and the user reads one line saying which service stopped
plus the service's own log line naming the model and why; no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import free_port, make_repository

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_up_with_exit_on_error_stops_on_a_model_that_fails_to_load(
    example_repo: Path, tmp_path: Path
) -> None:
    repo = make_repository(example_repo, tmp_path / "models", ["simple"])
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an ONNX model")
    (repo / "broken" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    ports = [free_port() for _ in range(4)]
    command = [
        sys.executable,
        "-m",
        "deploy.cli",
        "up",
        "--model-repository",
        str(repo),
        f"--grpc-port={ports[0]}",
        f"--http-port={ports[1]}",
        f"--metrics-port={ports[2]}",
        f"--control-port={ports[3]}",
        "--policy-file",
        str(tmp_path / "state" / "policies.json"),
        "--exit-on-error",
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "meshserve: service 'onnx' exited with 1" in done.stderr, out
    assert "--exit-on-error: stopping, model 'broken'" in out
    assert "Traceback" not in out
    # nothing it started still listens
    for port in ports:
        probe = subprocess.run(
            ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True, check=False
        )
        assert probe.returncode != 0, f"port {port} still open"
