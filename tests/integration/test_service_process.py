"""The ONNX service as a user starts it (`python -m services.onnx`): ports, metrics, and a
SIGTERM while requests wait in the queue — every one of them still gets its answer."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

SLOW = """
name: "slow"
platform: "onnxruntime_onnx"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 700000 preferred_batch_size: [ 8 ] }
"""


def _child_named(parent: int, name: str) -> int:
    """The pid of ``parent``'s child process whose command is ``name`` (from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            command = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and command == name:
            return int(stat.parent.name)
    raise AssertionError(f"no child process {name!r} of {parent}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_service_process_serves_and_drains_on_sigterm(example_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(example_repo / "simple", root / "simple")
    shutil.copytree(example_repo / "simple", root / "slow")
    (root / "slow" / "config.pbtxt").write_text(
        SLOW
    )  # inputs/outputs auto-completed from the model
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.onnx",
            "--model-repository",
            str(root),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = client.is_server_ready()
            except Exception:
                ready = False
            if ready:
                break
            time.sleep(0.1)
        assert ready, "service did not become ready"
        config = client.get_model_config("slow", as_json=True)["config"]
        assert [i["name"] for i in config["input"]] == ["INPUT0", "INPUT1"]  # auto-completed

        h = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        assert h.is_model_ready("simple")
        h.close()

        results: list[int] = []
        errors: list[BaseException] = []

        def one(i: int) -> None:
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            try:
                ins = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
                for x in ins:
                    x.set_data_from_numpy(np.full((1, 16), i, np.int32))
                results.append(int(c.infer("slow", ins).as_numpy("OUTPUT0")[0, 0]))
            except BaseException as exc:
                errors.append(exc)
            finally:
                c.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # let them reach the queue (they wait there up to 0.7 s)
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        assert 'nv_inference_pending_request_count{model="slow",version="1"} 3' in text
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert sorted(results) == [0, 2, 4]
        assert proc.wait(30) == 0
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        out = proc.stdout.read() if proc.stdout else ""
        print(out)


def test_a_service_whose_grpc_front_dies_exits_with_status_1(
    example_repo: Path, tmp_path: Path
) -> None:
    """A service that cannot answer gRPC any more stops, so that its supervisor restarts it."""
    import pytest

    from services.core.native_front import front_binary

    if front_binary() is None:
        pytest.skip("grpc_front is not built (make native; needs Debian's libgrpc++-dev)")
    root = tmp_path / "models"
    shutil.copytree(example_repo / "simple", root / "simple")
    grpc_port = free_port()
    command = [sys.executable, "-m", "services.onnx", "--model-repository", str(root)]
    command += ["--grpc-port", str(grpc_port), "--http-port", "-1", "--metrics-port", "-1"]
    proc = subprocess.Popen(
        [*command, "--grpc-frontend", "native"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                time.sleep(0.2)
        os.kill(_child_named(proc.pid, "grpc_front"), signal.SIGKILL)
        assert proc.wait(30) == 1
        assert proc.stdout is not None
        assert "the gRPC front exited: stopping the service" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
