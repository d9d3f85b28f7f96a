"""Calls from inside the mesh to other models, through the gateway (ensemble steps, BLS).

A service that calls another model goes through the mesh's Envoy gateway like any client, so
routing, traffic splits, retries and load balancing apply to its calls too. The gateway's gRPC
address comes from ``MESHSERVE_GATEWAY`` (``host:port``; the supervisor sets it for every
service), by default ``127.0.0.1:8001``.

Tensors travel between services in wire form (``WireTensor``: datatype, shape and the raw
little-endian bytes of ``raw_input_contents`` / ``raw_output_contents``), so an output passed on
to the next call is forwarded as the very bytes object it arrived in, never decoded and encoded
again. Numpy arrays are made only where a caller needs values (views over those bytes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protos.gen.inference import grpc_service_pb2 as pb
from services.core import dtypes
from services.core.errors import InternalError
from services.core.requests import Array

#: environment variable naming the gateway's gRPC address (``host:port``)
GATEWAY_ENV = "MESHSERVE_GATEWAY"
#: where calls go when the environment names no gateway
DEFAULT_GATEWAY = "127.0.0.1:8001"
#: gRPC message size limit of calls through the gateway (tensors as large as a client's)
MAX_MESSAGE_BYTES = 1 << 30
#: channel options for every in-mesh channel
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
#: the gateway's routing headers (control_plane/routes.py): model, and version when pinned
MODEL_HEADER = "meshserve-model"
VERSION_HEADER = "meshserve-version"


def gateway_address() -> str:
    """The gateway's gRPC address in-mesh calls go to."""
    return os.environ.get(GATEWAY_ENV, "").strip() or DEFAULT_GATEWAY


def routing_metadata(model_name: str, model_version: str = "") -> list[tuple[str, str]]:
    """Headers that route a call to ``model_name`` (and ``model_version`` when given) without
    the gateway reading its body (a stream is routed by them once, for every message)."""
    metadata = [(MODEL_HEADER, model_name)]
    if model_version:
        metadata.append((VERSION_HEADER, model_version))
    return metadata


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A tensor as the v2 protocol carries it: Triton datatype, shape, raw bytes."""

    datatype: str
    shape: tuple[int, ...]
    raw: bytes

    @classmethod
    def from_array(cls, datatype: str, array: Array) -> WireTensor:
        """Wire form of an array; reuses the bytes object an array decoded from the wire views."""
        shape = tuple(int(d) for d in array.shape)
        if datatype != "BYTES":
            base = _backing_bytes(array)
            if base is not None:
                return cls(datatype, shape, base)
        return cls(datatype, shape, dtypes.tensor_bytes(datatype, array))

    def array(self, source: str) -> Array:
        """The values as numpy (a read-only view over ``raw`` for fixed-size datatypes)."""
        datatype = dtypes.lookup(self.datatype, source)
        count = math.prod(self.shape)
        if datatype.byte_size == 0:
            return dtypes.deserialize_bytes(self.raw, count, source).reshape(self.shape)
        if len(self.raw) != count * datatype.byte_size:
            raise InternalError(
                f"{source} ({self.datatype}, shape {list(self.shape)}) came with "
                f"{len(self.raw)} bytes; expected {count * datatype.byte_size}"
            )
        return np.frombuffer(self.raw, dtype=datatype.numpy).reshape(self.shape)


def _backing_bytes(array: Array) -> bytes | None:
    """The bytes object ``array`` is a whole, contiguous view of (as decoded requests are)."""
    if not array.flags.c_contiguous:
        return None
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, bytes) and len(base) == array.nbytes:
        return base
    return None


def infer_message(
    model_name: str,
    model_version: str,
    inputs: Mapping[str, WireTensor],
    outputs: list[str],
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying ``inputs`` in ``raw_input_contents``, asking for ``outputs``."""
    message = pb.ModelInferRequest(
        model_name=model_name, model_version=model_version, id=request_id
    )
    for name, tensor in inputs.items():
        message.inputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_input_contents.append(tensor.raw)
    for name in outputs:
        message.outputs.add(name=name)
    return message


def response_tensors(message: pb.ModelInferResponse, source: str) -> dict[str, WireTensor]:
    """The outputs of a ModelInferResponse whose data is in ``raw_output_contents``."""
    if len(message.raw_output_contents) != len(message.outputs):
        raise InternalError(
            f"{source}: the response has {len(message.outputs)} outputs but "
            f"{len(message.raw_output_contents)} raw_output_contents; expected one per output"
        )
    return {
        out.name: WireTensor(out.datatype, tuple(int(d) for d in out.shape), raw)
        for out, raw in zip(message.outputs, message.raw_output_contents, strict=True)
    }
