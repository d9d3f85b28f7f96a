"""Transport-agnostic inference request and response.

The gRPC servicer and the HTTP app decode their wire formats into an InferRequest (tensors as
numpy arrays, decoded without copying where the wire allows) and encode an InferResponse back.
Everything between (validation, batching, execution, statistics) works on these types only.

Tensor representation: a numpy array whose dtype matches the Triton datatype (see dtypes.py);
BYTES tensors are object arrays of ``bytes``; BF16 tensors are arrays of dtype "V2"
(raw bits; view as uint16).
The datatype of every tensor is the one the model config declares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from services.core.decoupled import ResponseStream

Array = npt.NDArray[np.generic]
ParamValue = bool | int | float | str


@dataclass(slots=True)
class SharedMemoryRef:
    """Where a tensor lives (input) or must be written (output) in a registered region."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(slots=True)
class RequestedOutput:
    """One output the client asked for, and how it wants it delivered."""

    name: str
    #: top-k classification instead of the raw tensor (0 = raw tensor)
    classification: int = 0
    #: HTTP only: send as binary tensor data instead of JSON (None = transport default)
    binary_data: bool | None = None
    shared_memory: SharedMemoryRef | None = None


@dataclass(slots=True)
class InferRequest:
    model_name: str
    #: "" means "let the version policy choose" (the highest ready version)
    model_version: str
    inputs: dict[str, Array]
    #: empty means "every output of the model, as raw tensors"
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str = ""
    #: 0 means the model's default priority level
    priority: int = 0
    #: queue timeout in microseconds; 0 means the model's default
    timeout_us: int = 0
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    #: time.monotonic_ns() when the transport received the request
    arrival_ns: int = 0
    #: time.monotonic_ns() by which the caller stops waiting (its gRPC deadline); 0 = none
    deadline_ns: int = 0
    #: the OpenTelemetry context of the request's span (``services.core.tracing.current_context``),
    #: set by the transport, for work on other threads (Python backend execute, its BLS calls)
    trace_context: object | None = None
    #: where a decoupled model's responses go (``services.core.decoupled.ResponseStream``), set
    #: by the data plane for ModelStreamInfer; None for every other request
    response_stream: ResponseStream | None = None


@dataclass(slots=True)
class OutputTensor:
    name: str
    #: Triton datatype string ("FP32", "BYTES", ...)
    datatype: str
    data: Array
    #: set when the output was written into a shared-memory region instead of the response
    shared_memory: SharedMemoryRef | None = None
    binary_data: bool | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(slots=True)
class ItemResult:
    """What one request gets back from a batch: its slice of every output, and its timings."""

    outputs: dict[str, Array]
    queue_ns: int
    compute_input_ns: int
    compute_infer_ns: int
    compute_output_ns: int
    #: time.monotonic_ns() when its batch was handed to an instance, and when it came back
    #: (0: not run by the batcher); batch_size: the whole batch's size (for trace spans)
    batch_start_ns: int = 0
    batch_end_ns: int = 0
    batch_size: int = 0
