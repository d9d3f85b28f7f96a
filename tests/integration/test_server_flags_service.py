"""tritonserver's flags on real services: --strict-readiness (ServerReady over gRPC and HTTP, while
the mesh's health signals keep the service in), --exit-on-error with --log-file and --log-format
(a service process that stops, and says why, in its log file), --model-load-thread-count and
--model-load-retry-count (Python models that record their loads), and --id."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from examples.build_repository import build_repository
from protos.gen.health import health_pb2 as hpb
from protos.gen.health import health_pb2_grpc as hgrpc
from services.core.server_flags import ServerFlags
from services.onnx.runtime import OnnxRuntime
from services.python.runtime import PythonRuntime
from tests.support import ServerThread, settings_for

REPO_ROOT = Path(__file__).resolve().parents[2]


def _broken_model(root: Path) -> None:
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    (root / "broken" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return err.code


def _sum(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(a)
    assert np.array_equal(client.infer("simple", inputs).as_numpy("OUTPUT0"), a + a)


def test_strict_readiness_follows_the_models_and_the_mesh_signals_do_not(tmp_path: Path) -> None:
    build_repository(tmp_path, ["simple"])
    _broken_model(tmp_path)
    settings = settings_for(
        tmp_path,
        model_control_mode="explicit",
        startup_models=("*",),
        server_name="triton-a",
        flags=ServerFlags(strict_readiness=True),
    )
    with ServerThread(settings, [OnnxRuntime]) as server:
        http = f"http://{server.http_url.removeprefix('http://')}"
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            assert c.get_server_metadata().name == "triton-a"  # --id
            assert c.is_server_live()
            assert not c.is_server_ready()  # 'broken' failed to load
            assert _status(f"{http}/v2/health/ready") == 400
            # the mesh's signals: gRPC health and the gateway's REST check stay up
            assert _status(f"{http}/meshserve/v1/serving") == 200
            with grpc.insecure_channel(server.grpc_url) as channel:
                health = hgrpc.HealthStub(channel).Check(hpb.HealthCheckRequest(service=""))
            assert health.status == hpb.HealthCheckResponse.SERVING
            _sum(c)  # and the other model serves

            c.unload_model("broken")  # unloaded on request: no longer counts against readiness
            assert c.is_server_ready()
            assert _status(f"{http}/v2/health/ready") == 200

            with pytest.raises(InferenceServerException, match="Protobuf parsing failed"):
                c.load_model("broken")
            assert not c.is_server_ready()  # it failed again
            assert server.running is not None
            server.running.plane.strict_readiness = False  # without the flag: ready
            assert c.is_server_ready()


def test_exit_on_error_stops_the_process_and_logs_why_to_the_file(tmp_path: Path) -> None:
    build_repository(tmp_path, ["simple"])
    _broken_model(tmp_path)
    log_file = tmp_path / "service.log"
    command = [
        sys.executable,
        "-m",
        "services.onnx",
        "--model-repository",
        str(tmp_path),
        "--grpc-port=0",
        "--http-port=0",
        "--metrics-port=0",
        "--grpc-frontend=aio",
        "--exit-on-error",
        f"--log-file={log_file}",
        "--log-format=ISO8601",
        "--pinned-memory-pool-byte-size=268435456",
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1, done.stderr
    text = log_file.read_text()
    assert "--pinned-memory-pool-byte-size has no effect in meshserve" in text
    stop = [line for line in text.splitlines() if "--exit-on-error: stopping" in line]
    assert len(stop) == 1, text
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ERROR ", stop[0])
    assert "model 'broken'" in stop[0] and "'simple'" not in stop[0]
    assert "INFO" in text and done.stderr == ""  # everything went to the file


_RECORDING_MODEL = """
import json, os, time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        attempts = os.path.join(folder, "attempts")
        tried = int(open(attempts).read()) if os.path.exists(attempts) else 0
        with open(attempts, "w") as f:
            f.write(str(tried + 1))
        if tried < int(json.loads(args["model_config"])["parameters"]["FAILS"]["string_value"]):
            raise RuntimeError(f"load attempt {tried + 1} fails on purpose")
        start = time.monotonic()
        time.sleep(0.4)
        with open(os.path.join(folder, "loaded"), "w") as f:
            f.write(f"{start} {time.monotonic()}")

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "IN").as_numpy())]
            )
            for r in requests
        ]
"""


def _recording_models(root: Path, names: list[str], fails: int = 0) -> None:
    for name in names:
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(textwrap.dedent(_RECORDING_MODEL))
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\n'
            'input [{ name: "IN", data_type: TYPE_FP32, dims: [1] }]\n'
            'output [{ name: "OUT", data_type: TYPE_FP32, dims: [1] }]\n'
            f'parameters {{ key: "FAILS" value {{ string_value: "{fails}" }} }}\n'
        )


def _load_intervals(root: Path, names: list[str]) -> list[tuple[float, float]]:
    out = []
    for name in names:
        start, end = (root / name / "loaded").read_text().split()
        out.append((float(start), float(end)))
    return sorted(out)


def test_model_load_thread_count_bounds_the_loads_at_once(tmp_path: Path) -> None:
    names = ["m1", "m2", "m3"]
    for limit, root in ((1, tmp_path / "one"), (3, tmp_path / "three")):
        root.mkdir()
        _recording_models(root, names)
        settings = settings_for(root, flags=ServerFlags(model_load_thread_count=limit))
        ServerThread(settings, [PythonRuntime]).start().stop()
        spans = _load_intervals(root, names)
        overlapping = any(b[0] < a[1] for a, b in itertools.pairwise(spans))
        assert overlapping is (limit > 1), (limit, spans)


def test_model_load_retry_count_tries_a_failed_load_again(tmp_path: Path) -> None:
    for retries, root in ((0, tmp_path / "none"), (2, tmp_path / "two")):
        root.mkdir()
        _recording_models(root, ["flaky"], fails=2)  # the first two attempts fail
        settings = settings_for(root, flags=ServerFlags(model_load_retry_count=retries))
        with (
            ServerThread(settings, [PythonRuntime]) as server,
            grpcclient.InferenceServerClient(server.grpc_url) as c,
        ):
            (entry,) = c.get_model_repository_index().models
            if retries:
                assert entry.state == "READY"
                x = grpcclient.InferInput("IN", [1], "FP32")
                x.set_data_from_numpy(np.array([2.5], np.float32))
                assert c.infer("flaky", [x]).as_numpy("OUT").tolist() == [2.5]
            else:
                assert entry.state == "UNAVAILABLE"
                assert "load attempt 1 fails on purpose" in entry.reason
        assert (root / "flaky" / "attempts").read_text() == ("3" if retries else "1")


def test_allow_cpu_metrics_false_leaves_the_host_metrics_out(tmp_path: Path) -> None:
    build_repository(tmp_path, ["simple"])
    for allowed in (True, False):
        settings = settings_for(tmp_path, flags=ServerFlags(allow_cpu_metrics=allowed))
        with (
            ServerThread(settings, [OnnxRuntime]) as server,
            urllib.request.urlopen(server.metrics_url, timeout=10) as response,
        ):
            page = response.read().decode()
        names = ("nv_cpu_utilization ", "nv_cpu_memory_total_bytes ", "nv_cpu_memory_used_bytes ")
        assert all((name in page) == allowed for name in names), page[-600:]
        assert "nv_inference_count" in page
