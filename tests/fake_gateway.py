"""A gRPC server on 127.0.0.1 port 0 standing in for the mesh's gateway (BLS and ensemble tests).

``serving_as_gateway(servicer, monkeypatch)`` serves ``servicer`` (a GRPCInferenceService) and
points ``MESHSERVE_GATEWAY`` at it for the test; the server always stops afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos.gen.inference import grpc_service_pb2_grpc as pb_grpc
from services.core import gateway_client


@contextlib.contextmanager
def serving_as_gateway(
    servicer: pb_grpc.GRPCInferenceServiceServicer,
    monkeypatch: pytest.MonkeyPatch,
    workers: int = 4,
) -> Iterator[None]:
    server = grpc.server(ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv(gateway_client.GATEWAY_ENV, f"127.0.0.1:{port}")
    try:
        yield
    finally:
        server.stop(None)
