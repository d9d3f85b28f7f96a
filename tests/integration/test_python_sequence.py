"""A stateful Python model (``sequence_python``) served with the sequence batcher.

The model keeps its running sums in the model object, per instance, keyed by
``correlation_id()``; it has two instances, so the sums are right only if every request of a
sequence reaches the instance that saw its START, and ``flags()`` carries START and END.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from examples.build_python import build_python_repository
from services.python.runtime import PythonRuntime
from tests.support import ServerThread, settings_for

MODEL = "sequence_python"
SEQUENCES: list[int | str] = [11, 12, "alpha", "beta", 15, 16]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root: Path = tmp_path_factory.mktemp("python_sequence")
    build_python_repository(root, [MODEL])
    with ServerThread(settings_for(root), [PythonRuntime]) as running:
        yield running


def step(
    client: grpcclient.InferenceServerClient,
    sid: int | str,
    value: int,
    start: bool = False,
    end: bool = False,
) -> int:
    tensor = grpcclient.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], np.int32))
    result = client.infer(MODEL, [tensor], sequence_id=sid, sequence_start=start, sequence_end=end)
    out = result.as_numpy("OUTPUT")
    assert out is not None
    return int(out[0, 0])


def run_sequence(url: str, sid: int | str, values: list[int]) -> list[int]:
    with grpcclient.InferenceServerClient(url) as client:
        last = len(values) - 1
        return [step(client, sid, v, start=(i == 0), end=(i == last)) for i, v in enumerate(values)]


def test_concurrent_sequences_keep_their_own_sums_across_two_instances(
    server: ServerThread,
) -> None:
    plans: dict[int | str, list[int]] = {
        sid: [((sid_index + 1) * k) % 17 for k in range(1, 16)]
        for sid_index, sid in enumerate(SEQUENCES)
    }
    with ThreadPoolExecutor(len(plans)) as pool:
        runs = {sid: pool.submit(run_sequence, server.grpc_url, sid, v) for sid, v in plans.items()}
        got = {sid: run.result(timeout=60) for sid, run in runs.items()}
    assert got == {sid: list(np.cumsum(v)) for sid, v in plans.items()}
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(MODEL).model_stats[0]
    assert stats.inference_count >= 6 * 15


def test_end_forgets_the_sequence_and_start_begins_again(server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert step(client, 99, 5, start=True) == 5
        assert step(client, 99, 6) == 11
        assert step(client, 99, 6, start=True) == 6  # START resets the model's sum
        assert step(client, 99, 1, end=True) == 7
        with pytest.raises(InferenceServerException, match="START flag") as refused:
            step(client, 99, 1)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert step(client, 99, 2, start=True, end=True) == 2
