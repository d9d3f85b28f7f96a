"""Stateful models through the gateway: every family's accumulator (``Family.sequence``) keeps
each sequence's running sum across requests that reach it through Envoy, over tritonclient gRPC
(unary and streaming) and HTTP, and stock perf_analyzer drives it in sequence mode."""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.conformance.families import Family, family_param, need
from tests.e2e.conformance.test_perf_analyzer import MISSING, perf_analyzer, success_count
from tests.e2e.conftest import MeshHandle


def stateful(family: Family) -> Family:
    need(family)
    if not family.sequence:
        pytest.skip(f"{family.name}: no stateful example")
    return family


def values_for(sid: int) -> list[int]:
    return [(sid * 7 + k * 3) % 11 - 4 for k in range(12)]


def step(
    module: Any, client: Any, family: Family, sid: int | str, value: int, start: bool, end: bool
) -> int:
    name_in, name_out = family.sequence_io
    tensor = module.InferInput(name_in, [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], np.int32))
    result = client.infer(
        family.sequence, [tensor], sequence_id=sid, sequence_start=start, sequence_end=end
    )
    return int(result.as_numpy(name_out)[0, 0])


def run_sequence(
    module: Any, client: Any, family: Family, sid: int | str, values: list[int]
) -> list[int]:
    last = len(values) - 1
    return [
        step(module, client, family, sid, v, start=i == 0, end=i == last)
        for i, v in enumerate(values)
    ]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("family", family_param())
def test_concurrent_sequences_keep_their_sums(
    mesh: MeshHandle, family: Family, protocol: str
) -> None:
    family = stateful(family)
    module: Any = grpcclient if protocol == "grpc" else httpclient
    url = mesh.grpc_url if protocol == "grpc" else mesh.http_url
    ids: list[int | str] = [101, 102, "s-103", 104]

    def one(sid: int | str) -> list[int]:
        client = module.InferenceServerClient(url)
        try:
            return run_sequence(
                module, client, family, sid, values_for(len(str(sid)) + ids.index(sid))
            )
        finally:
            client.close()

    with ThreadPoolExecutor(len(ids)) as pool:
        got = list(pool.map(one, ids))
    expected = [list(np.cumsum(values_for(len(str(s)) + ids.index(s)))) for s in ids]
    assert got == expected
    client = module.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException, match="START flag"):
            step(module, client, family, 101, 1, start=False, end=False)  # 101 has ended
        assert step(module, client, family, 101, 5, start=True, end=True) == 5
    finally:
        client.close()


@pytest.mark.parametrize("family", family_param())
def test_sequences_on_one_stream(mesh: MeshHandle, family: Family) -> None:
    family = stateful(family)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    plans = {201: values_for(3), 202: values_for(4), 203: values_for(5)}
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for step in range(12):
            for sid, values in plans.items():
                tensor = grpcclient.InferInput(family.sequence_io[0], [1, 1], "INT32")
                tensor.set_data_from_numpy(np.array([[values[step]]], np.int32))
                client.async_stream_infer(
                    family.sequence,
                    [tensor],
                    request_id=f"{sid}:{step}",
                    sequence_id=sid,
                    sequence_start=step == 0,
                    sequence_end=step == 11,
                )
        got: dict[str, int] = {}
        for _ in range(12 * len(plans)):
            result, error = answers.get(timeout=60)
            assert error is None, error
            got[result.get_response().id] = int(result.as_numpy(family.sequence_io[1])[0, 0])
    finally:
        client.stop_stream()
        client.close()
    for sid, values in plans.items():
        assert [got[f"{sid}:{step}"] for step in range(12)] == list(np.cumsum(values))


@pytest.mark.skipif(bool(MISSING), reason=MISSING)
@pytest.mark.parametrize("way", [("grpc",), ("grpc", "--streaming"), ("http",)])
@pytest.mark.parametrize("family", family_param())
def test_perf_analyzer_drives_sequences(
    mesh: MeshHandle, family: Family, way: tuple[str, ...]
) -> None:
    family = stateful(family)
    before = success_count(mesh, family.sequence)
    options = ("--sequence-length", "6", "--concurrency-range", "3", *way[1:])
    counted = perf_analyzer(mesh, family.sequence, way[0], *options)
    assert counted > 0
    assert success_count(mesh, family.sequence) - before >= counted
