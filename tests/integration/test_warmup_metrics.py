"""model_warmup runs before a version turns READY (a failing sample fails the load), and the
metrics port exposes Triton's metric names with the counts the requests produced."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support import ServerThread, settings_for

WARMUP = """
model_warmup [
  {
    name: "zeros"
    batch_size: 4
    count: 3
    inputs { key: "INPUT0" value: { data_type: TYPE_INT32 dims: [ 16 ] zero_data: true } }
    inputs { key: "INPUT1" value: { data_type: TYPE_INT32 dims: [ 16 ] random_data: true } }
  }
]
"""

BAD_WARMUP = """
model_warmup [
  {
    name: "wrong_shape"
    batch_size: 1
    inputs { key: "INPUT0" value: { data_type: TYPE_INT32 dims: [ 3 ] zero_data: true } }
    inputs { key: "INPUT1" value: { data_type: TYPE_INT32 dims: [ 3 ] zero_data: true } }
  }
]
"""


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, rest = head.partition("{")
        labels = tuple(
            sorted(
                (k, v.strip('"'))
                for k, v in (pair.split("=", 1) for pair in rest.rstrip("}").split(",") if pair)
            )
        )
        out[(name, labels)] = float(value)
    return out


def test_warmup_and_metrics(example_repo: Path, tmp_path: Path) -> None:
    from services.onnx.runtime import OnnxRuntime

    root = tmp_path / "models"
    for name, extra in (("warm", WARMUP), ("cold", BAD_WARMUP)):
        shutil.copytree(example_repo / "simple", root / name)
        cfg = (
            (example_repo / "simple" / "config.pbtxt").read_text().replace('"simple"', f'"{name}"')
        )
        (root / name / "config.pbtxt").write_text(cfg + extra)
    with ServerThread(settings_for(root), [OnnxRuntime]) as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            assert client.is_model_ready("warm")
            assert not client.is_model_ready("cold")
            index = {
                m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]
            }
            assert index["cold"]["state"] == "UNAVAILABLE"
            assert "wrong_shape" in index["cold"]["reason"]
            # warmup runs do not count as inferences
            stats = client.get_inference_statistics("warm", as_json=True)["model_stats"][0]
            assert int(stats.get("inference_count", 0)) == 0

            ins = [grpcclient.InferInput(n, [2, 16], "INT32") for n in ("INPUT0", "INPUT1")]
            for i in ins:
                i.set_data_from_numpy(np.ones((2, 16), np.int32))
            for _ in range(3):
                client.infer("warm", ins)
            with pytest.raises(InferenceServerException):
                client.infer("warm", ins[:1])  # missing INPUT1: one REJECTED failure
            text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
            values = parse_metrics(text)
            warm = (("model", "warm"), ("version", "1"))
            assert values[("nv_inference_request_success", warm)] == 3
            assert (
                values[
                    ("nv_inference_request_failure", tuple(sorted((*warm, ("reason", "REJECTED")))))
                ]
                == 1
            )
            assert values[("nv_inference_count", warm)] == 6
            assert values[("nv_inference_exec_count", warm)] == 3
            assert values[("nv_inference_pending_request_count", warm)] == 0
            assert (
                values[("nv_inference_batch_size_bucket", tuple(sorted((*warm, ("le", "2.0")))))]
                == 3
            )
            assert (
                values[("nv_inference_batch_size_bucket", tuple(sorted((*warm, ("le", "1.0")))))]
                == 0
            )
            for name in (
                "nv_inference_request_duration_us",
                "nv_inference_queue_duration_us",
                "nv_inference_compute_input_duration_us",
                "nv_inference_compute_infer_duration_us",
                "nv_inference_compute_output_duration_us",
            ):
                assert (name, warm) in values, name
            assert values[("nv_inference_request_duration_us", warm)] > 0
            lines = text.splitlines()
            assert "# TYPE nv_inference_request_success counter" in lines
        finally:
            client.close()
