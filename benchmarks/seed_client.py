"""The seed benchmark's client side: one timed call per batch through the gateway, two ways.

``served_timer`` sends one request per batch, its input made either by ``wire_input`` (the batch
in the request as raw binary contents, stock tritonclient gRPC) or by ``shm_input`` (the batch
copied into a ``SharedRegion``, POSIX shared memory registered through the gateway, which
registers it on every service of the host; the request sends only the region's name).
``service_seconds`` reads the service's own account (ModelStatistics) so benchmarks/seed.py can
split a wire call's time into the framework's and the transport's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm

from benchmarks.seed_inprocess import Images
from benchmarks.seed_models import SeedModel

#: the service's own seconds (ModelStatistics): whole requests, and the framework's execution alone
SERVICE, COMPUTE = "service", "compute"

#: runs images[start:stop] one way and returns the seconds it took
Timer = Callable[[int, int], float]


#: builds the request's input for a batch (and puts the batch where that input says)
InputFor = Callable[[Images], grpcclient.InferInput]


def wire_input(model: SeedModel) -> InputFor:
    """The batch as raw binary contents of the request."""

    def make(batch: Images) -> grpcclient.InferInput:
        tensor = grpcclient.InferInput(model.input_name, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        return tensor

    return make


class SharedRegion:
    """A POSIX shared-memory region made by this process and registered through the gateway
    (which registers it on every co-located service); ``close`` unregisters and destroys it."""

    def __init__(self, client: grpcclient.InferenceServerClient, name: str, size: int) -> None:
        self.name = name
        self._client = client
        key = f"/meshserve_seed_{os.getpid()}_{name}"
        self.handle = shm.create_shared_memory_region(name, key, size)
        try:
            client.register_system_shared_memory(name, key, size)
        except Exception:
            shm.destroy_shared_memory_region(self.handle)
            raise

    def close(self) -> None:
        try:
            self._client.unregister_system_shared_memory(self.name)
        finally:
            shm.destroy_shared_memory_region(self.handle)


def shm_input(model: SeedModel, region: SharedRegion) -> InputFor:
    """The batch copied into ``region``; the request names the region."""

    def make(batch: Images) -> grpcclient.InferInput:
        shm.set_shared_memory_region(region.handle, [batch])
        tensor = grpcclient.InferInput(model.input_name, list(batch.shape), "FP32")
        tensor.set_shared_memory(region.name, batch.nbytes)
        return tensor

    return make


def served_timer(
    client: grpcclient.InferenceServerClient, model: SeedModel, images: Images, make: InputFor
) -> Timer:
    """One ModelInfer per batch through the gateway, its input made by ``make`` (timed too)."""
    outputs = [grpcclient.InferRequestedOutput(model.output_name)]

    def run(start: int, stop: int) -> float:
        began = time.perf_counter()
        batch = images[start:stop]
        result = client.infer(model.name, [make(batch)], outputs=outputs)
        scores = result.as_numpy(model.output_name)
        seconds = time.perf_counter() - began
        if scores is None or scores.shape != (len(batch), 1000):
            raise RuntimeError(f"{model.name}: no [{len(batch)}, 1000] {model.output_name}")
        return seconds

    return run


def check_shm_matches_wire(
    client: grpcclient.InferenceServerClient, model: SeedModel, images: Images, region: SharedRegion
) -> None:
    """The same batch sent both ways gives the same scores (the service read the region)."""
    batch = images[:1]
    by_wire, by_shm = (
        client.infer(model.name, [make(batch)]).as_numpy(model.output_name)
        for make in (wire_input(model), shm_input(model, region))
    )
    if by_wire is None or by_shm is None or not np.allclose(by_wire, by_shm, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"{model.name}: scores from shared memory differ from the wire's")


def service_seconds(client: grpcclient.InferenceServerClient, model: SeedModel) -> dict[str, float]:
    """The service's cumulative request and compute seconds for ``model`` (via the gateway)."""
    stats = client.get_inference_statistics(model.name).model_stats[0].inference_stats
    return {SERVICE: stats.success.ns / 1e9, COMPUTE: stats.compute_infer.ns / 1e9}
