"""Stock perf_analyzer (Triton's C++ client library) against every family through the gateway.

Users measure with perf_analyzer before they trust a server: each family's add/sub model must
take its load over gRPC, HTTP, gRPC streaming and system shared memory (both protocols), and its
identity model every datatype the family carries, with perf_analyzer exiting 0 and the service
counting the requests it reported. perf_analyzer is set up by ``make test`` / ``make bench``
(benchmarks/setup_perf_analyzer.sh); where it could not be, these tests skip and say so.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.conformance.families import Family, family_param, need
from tests.e2e.conftest import MeshHandle

PERF_ANALYZER = Path(__file__).resolve().parents[3] / "benchmarks" / ".tools" / "perf_analyzer"

#: perf_analyzer's options per way of calling: protocol, then extra options
WAYS = {
    "grpc": ("grpc", ()),
    "http": ("http", ()),
    "grpc-streaming": ("grpc", ("--streaming",)),
    "grpc-shm": ("grpc", ("--shared-memory", "system")),
    "http-shm": ("http", ("--shared-memory", "system")),
}


def _missing() -> str:
    if not PERF_ANALYZER.is_file():
        return f"{PERF_ANALYZER} is not set up (bash benchmarks/setup_perf_analyzer.sh)"
    try:
        subprocess.run(
            [str(PERF_ANALYZER), "--version"], capture_output=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{PERF_ANALYZER} does not run here: {exc}"
    return ""


MISSING = _missing()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING)


def success_count(mesh: MeshHandle, model: str) -> int:
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        stats = client.get_inference_statistics(model)
        return sum(m.inference_stats.success.count for m in stats.model_stats)
    finally:
        client.close()


def perf_analyzer(mesh: MeshHandle, model: str, protocol: str, *options: str) -> int:
    """Run perf_analyzer at concurrency 1 for three short windows; the requests it counted."""
    url = mesh.grpc_url if protocol == "grpc" else mesh.http_url
    command = [str(PERF_ANALYZER), "-i", protocol, "-u", url, "-m", model, *options]
    # three 300 ms windows, taken as stable whatever they measure: this checks that the calls
    # work, not how fast they are
    command += ["--measurement-interval", "300", "--stability-percentage", "999"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"perf_analyzer exited {done.returncode}:\n{output[-3000:]}"
    assert "error" not in output.lower(), output[-3000:]
    found = re.search(r"Successful request count: (\d+)", output)
    assert found is not None, output[-3000:]
    return int(found.group(1))


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("family", family_param())
def test_perf_analyzer_loads_the_add_sub_model(mesh: MeshHandle, family: Family, way: str) -> None:
    need(family)
    protocol, options = WAYS[way]
    before = success_count(mesh, family.model)
    counted = perf_analyzer(mesh, family.model, protocol, *options)
    assert counted > 0
    assert success_count(mesh, family.model) - before >= counted


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("family", family_param())
def test_perf_analyzer_sends_every_datatype(
    mesh: MeshHandle, family: Family, protocol: str
) -> None:
    need(family)
    # the identity model's inputs have dims [-1]: perf_analyzer needs a shape for each
    shapes = [f"--shape=IN_{datatype}:3" for datatype in family.datatypes]
    before = success_count(mesh, family.identity)
    counted = perf_analyzer(mesh, family.identity, protocol, *shapes)
    assert counted > 0
    assert success_count(mesh, family.identity) - before >= counted
