"""Requests through the mesh's gateway for the end-to-end tests: ``simple_inputs`` (one
``simple`` request and its expected sum) and ``Load`` (threads of callers sending them until
stopped, recording what each request got).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient


def simple_inputs(value: int = 1) -> tuple[list[grpcclient.InferInput], np.ndarray]:
    """INPUT0 = 0..15, INPUT1 = ``value``: OUTPUT0 is their sum."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), value, dtype=np.int32)
    inputs = [grpcclient.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs, a + b


@dataclass
class LoadResult:
    """What a load run saw: (monotonic time, version or error text) per request."""

    ok: list[tuple[float, str]] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)


class Load:
    """``threads`` callers sending ``simple`` infers (no version) through the gateway until
    stopped; ``with Load(...) as load:`` starts and always stops them."""

    def __init__(self, grpc_url: str, threads: int = 8, model: str = "simple") -> None:
        self.grpc_url = grpc_url
        self.model = model
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._caller, name=f"e2e-load-{n}", daemon=True)
            for n in range(threads)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _caller(self) -> None:
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            inputs, expected = simple_inputs(3)
            while not self._stop.is_set():
                try:
                    r = client.infer(self.model, inputs, client_timeout=10)
                    assert np.array_equal(r.as_numpy("OUTPUT0"), expected)
                    outcome, ok = str(r.get_response().model_version), True
                except Exception as exc:
                    outcome, ok = f"{type(exc).__name__}: {exc}", False
                with self._lock:
                    (self.result.ok if ok else self.result.failed).append(
                        (time.monotonic(), outcome)
                    )
        finally:
            client.close()

    def snapshot(self) -> LoadResult:
        with self._lock:
            return LoadResult(list(self.result.ok), list(self.result.failed))
