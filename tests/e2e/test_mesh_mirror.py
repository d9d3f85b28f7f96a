"""The whole mesh through Envoy: traffic mirroring (shadow traffic) of ``simple``.

One mesh for the module (control plane, Envoy, one ONNX service serving ``simple`` versions 1 and
2). Clients call with stock tritonclient and no version; the reply must always come from the
primary version, while the shadow version's own statistics (ModelStatistics of that version,
``inference_count``) show the mirrored copies. Envoy sends the copies asynchronously, so counts are
polled until they settle, within a bound.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.e2e.conftest import MeshHandle, make_repository, running_mesh, wait_for
from tests.e2e.traffic import simple_inputs

SETTLE_S = 15.0


@pytest.fixture(scope="module")
def mesh(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshHandle]:
    tmp = tmp_path_factory.mktemp("mirror-mesh")
    repo = make_repository(example_repo, tmp / "models", ["simple"], simple_versions=2)
    with running_mesh(repo, tmp) as handle:
        yield handle


@pytest.fixture
def no_policy(mesh: MeshHandle) -> Iterator[None]:
    """The test may split or mirror ``simple``; both are cleared afterwards, whatever happened."""
    try:
        yield
    finally:
        mesh.clear_split("simple")
        clear_mirror(mesh)


@pytest.fixture
def grpc_client(mesh: MeshHandle) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    try:
        yield client
    finally:
        client.close()


def set_mirror(mesh: MeshHandle, version: str, percent: float) -> dict[str, object]:
    """PUT a mirror and wait until the gateway ACKed the snapshot that carries it."""
    code, doc = mesh.api("PUT", "mirrors/simple", {"version": version, "percent": percent})
    assert code == 200, doc
    mesh.wait_acked(str(doc["snapshot_version"]))
    return doc


def clear_mirror(mesh: MeshHandle) -> None:
    code, doc = mesh.api("DELETE", "mirrors/simple")
    assert code == 200, doc
    mesh.wait_acked(str(doc["snapshot_version"]))


def served(client: grpcclient.InferenceServerClient, version: str) -> int:
    """Inferences version ``version`` of ``simple`` has run (its own statistics)."""
    stats = client.get_inference_statistics("simple", version).model_stats
    return sum(int(s.inference_count) for s in stats)


def counts(client: grpcclient.InferenceServerClient) -> dict[str, int]:
    return {v: served(client, v) for v in ("1", "2")}


def settles_at(client: grpcclient.InferenceServerClient, expected: dict[str, int]) -> None:
    """Poll until every version has served at least ``expected``, then demand exactly that."""

    def reached() -> dict[str, int] | None:
        now = counts(client)
        return now if all(now[v] >= n for v, n in expected.items()) else None

    assert wait_for(reached, SETTLE_S, f"versions of simple to serve {expected}") == expected


def stays_at(client: grpcclient.InferenceServerClient, expected: dict[str, int]) -> None:
    """Nothing more arrives for a second (mirrored copies are sent asynchronously)."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert counts(client) == expected
        time.sleep(0.1)


def quiet(client: grpcclient.InferenceServerClient) -> dict[str, int]:
    """The counts once they stopped changing for a second (bounded by ``SETTLE_S``)."""
    last: list[dict[str, int]] = [counts(client)]
    since = [time.monotonic()]

    def unchanged_for_a_second() -> dict[str, int] | None:
        now = counts(client)
        if now != last[0]:
            last[0], since[0] = now, time.monotonic()
        return now if time.monotonic() - since[0] >= 1.0 else None

    settled = wait_for(unchanged_for_a_second, SETTLE_S, "statistics of simple to settle")
    assert settled is not None
    return settled


def infer_versions(
    client: grpcclient.InferenceServerClient,
    n: int,
    *,
    version: str = "",
    headers: dict[str, str] | None = None,
) -> Counter[str]:
    """``n`` ModelInfer calls of ``simple``; the version each reply came from."""
    inputs, expected = simple_inputs(4)
    seen: Counter[str] = Counter()
    for _ in range(n):
        result = client.infer(
            "simple", inputs, model_version=version, headers=headers, client_timeout=10
        )
        assert np.array_equal(result.as_numpy("OUTPUT0"), expected)
        seen[result.get_response().model_version] += 1
    return seen


def test_every_request_is_mirrored_and_only_the_primary_answers(
    mesh: MeshHandle, no_policy: None, grpc_client: grpcclient.InferenceServerClient
) -> None:
    """No split: the primary is the highest version (2); mirror 100 % to version 1."""
    doc = set_mirror(mesh, "1", 100)
    assert doc["active"] is True and doc["version"] == "1", doc
    before = counts(grpc_client)

    by_body = infer_versions(grpc_client, 30)
    by_header = infer_versions(grpc_client, 5, headers={"meshserve-model": "simple"})
    http = httpclient.InferenceServerClient(mesh.http_url, network_timeout=30)
    try:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs = [httpclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        for i in inputs:
            i.set_data_from_numpy(a)
        rest = Counter(
            http.infer("simple", inputs).get_response()["model_version"] for _ in range(5)
        )
    finally:
        http.close()
    assert by_body == Counter({"2": 30}) and by_header == Counter({"2": 5}), (by_body, by_header)
    assert rest == Counter({"2": 5}), rest
    after = {"1": before["1"] + 40, "2": before["2"] + 40}
    settles_at(grpc_client, after)

    # a request naming its version asks for exactly that version: not mirrored
    assert infer_versions(grpc_client, 10, version="2") == Counter({"2": 10})
    after["2"] += 10
    settles_at(grpc_client, after)
    stays_at(grpc_client, after)

    # mirror off: the shadow no longer grows
    clear_mirror(mesh)
    assert infer_versions(grpc_client, 20) == Counter({"2": 20})
    after["2"] += 20
    settles_at(grpc_client, after)
    stays_at(grpc_client, after)


def test_mirror_copies_of_a_split_go_to_the_shadow_version(
    mesh: MeshHandle, no_policy: None, grpc_client: grpcclient.InferenceServerClient
) -> None:
    """Split 50/50 and mirror 100 % to version 2: a copy of a request the split sent to version
    1 carries version 1's routing header unless the mirror overwrites it; version 2 must serve
    every copy, version 1 only its primaries."""
    mesh.set_split("simple", {"1": 50, "2": 50})
    set_mirror(mesh, "2", 100)
    before = counts(grpc_client)
    seen = infer_versions(grpc_client, 60)
    assert set(seen) == {"1", "2"}, seen
    settles_at(grpc_client, {"1": before["1"] + seen["1"], "2": before["2"] + seen["2"] + 60})


def test_streamed_requests_are_mirrored_too(
    mesh: MeshHandle, no_policy: None, grpc_client: grpcclient.InferenceServerClient
) -> None:
    set_mirror(mesh, "1", 100)
    before = counts(grpc_client)
    replies: list[str] = []

    def collect(result: grpcclient.InferResult | None, error: Exception | None) -> None:
        if error is not None or result is None:
            replies.append(f"error: {error}")
        else:
            replies.append(result.get_response().model_version)

    inputs, _ = simple_inputs(2)
    grpc_client.start_stream(callback=collect, stream_timeout=30)
    try:
        for _ in range(8):
            grpc_client.async_stream_infer("simple", inputs)
        wait_for(lambda: len(replies) >= 8, 10, "8 streamed replies")
    finally:
        grpc_client.stop_stream()
    assert replies == ["2"] * 8, replies
    settles_at(grpc_client, {"1": before["1"] + 8, "2": before["2"] + 8})


def test_a_fraction_of_requests_is_mirrored(
    mesh: MeshHandle, no_policy: None, grpc_client: grpcclient.InferenceServerClient
) -> None:
    set_mirror(mesh, "1", 25)
    before = counts(grpc_client)
    assert infer_versions(grpc_client, 400) == Counter({"2": 400})
    after = quiet(grpc_client)
    assert after["2"] == before["2"] + 400
    mirrored = after["1"] - before["1"]
    assert 60 <= mirrored <= 140, mirrored  # 25 % of 400 = 100, ± 4.6 standard deviations


def test_mirror_policy_through_the_api_and_the_cli(mesh: MeshHandle, no_policy: None) -> None:
    def meshserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deploy.cli", "--url", f"http://{mesh.http_url}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = meshserve("mirror", "simple", "2", "--percent", "12.5")
    assert done.returncode == 0, done.stderr
    assert "mirror simple: 12.5% to version 2 (active)" in done.stdout, done.stdout
    assert "mirror simple: 12.5% to version 2 (active)" in meshserve("status").stdout

    # a shadow that is READY nowhere: kept, but inactive, and the gateway takes the config
    code, doc = mesh.api("PUT", "mirrors/simple", {"version": "7", "percent": 10})
    assert code == 200 and doc["active"] is False, doc
    assert "version 7" in str(doc["reason"]) and "not READY" in str(doc["reason"]), doc
    mesh.wait_acked(str(doc["snapshot_version"]))
    status = mesh.status()
    assert status is not None
    assert status["mirrors"]["simple"]["active"] is False, status["mirrors"]
    assert all(not t["error"] for g in status["gateways"].values() for t in g.values()), status
    assert "(inactive: version 7" in meshserve("status").stdout

    for body, words in (
        ({"version": "2", "percent": 0}, "in (0, 100]"),
        ({"version": "2", "percent": 101}, "in (0, 100]"),
        ({"version": "x", "percent": 10}, "not a positive integer"),
        ({"version": "2"}, "percent"),
    ):
        code, doc = mesh.api("PUT", "mirrors/simple", body)
        assert code == 400 and words in doc["error"], (body, doc)
    refused = meshserve("mirror", "simple", "2", "--percent", "0")
    assert refused.returncode != 0 and "in (0, 100]" in refused.stderr, refused.stderr

    off = meshserve("mirror", "simple", "--off")
    assert off.returncode == 0, off.stderr
    assert "mirror simple" not in meshserve("status").stdout
