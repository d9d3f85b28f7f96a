"""gRPC wire ⇄ transport-agnostic requests: ModelInferRequest → InferRequest, InferResponse → reply.

The gRPC servicer calls ``decode_infer_request`` as soon as a ModelInfer message arrives; the
result goes to validation and the batcher. When the batch is done, ``encode_infer_response``
turns the InferResponse back into a ModelInferResponse.

Inputs sent as ``raw_input_contents`` (what tritonclient and perf_analyzer send) become numpy
views over the received bytes, passed as ``raw``: for large messages, slices of the message as
gRPC received it (wire.py), so the tensor bytes are never copied; for small ones, the entries
protobuf parsed. Such arrays are read-only. Typed ``contents`` are converted (one copy). Inputs
in a registered shared-memory region are views over the region (read through SharedMemoryReader).

Outputs always travel as ``raw_output_contents``, one entry per output in output order (an empty
entry for outputs written into shared memory), because tritonclient finds an output's data by
its index among the outputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from protos.gen.inference import grpc_service_pb2 as pb
from services.core import dtypes
from services.core.dtypes import DataType
from services.core.errors import InvalidArgument, Unsupported
from services.core.requests import (
    Array,
    InferRequest,
    InferResponse,
    ParamValue,
    RequestedOutput,
    SharedMemoryRef,
)

REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
CLASSIFICATION = "classification"


class SharedMemoryReader(Protocol):
    """Read access to registered system shared-memory regions (implemented in shm.py)."""

    def read(
        self, region: str, offset: int, byte_size: int, *, tensor: str | None = None
    ) -> memoryview:
        """``byte_size`` bytes at ``offset`` of ``region``; NotFound / InvalidArgument (naming
        ``tensor``) if not."""
        ...


# Typed contents field of each datatype and the numpy dtype its values arrive in.
# FP16 and BF16 have no field: they can only be sent raw.
_CONTENTS_FIELD: dict[str, tuple[str, np.dtype[np.generic]]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(object)),
}
_ALL_FIELDS = tuple(pb.InferTensorContents.DESCRIPTOR.fields_by_name)


def decode_infer_request(
    msg: pb.ModelInferRequest,
    shm: SharedMemoryReader | None,
    *,
    arrival_ns: int | None = None,
    raw: Sequence[bytes | memoryview] | None = None,
) -> InferRequest:
    """Decode a ModelInfer request; raises InvalidArgument naming the input and the fix.

    ``shm`` reads inputs that name a shared-memory region (None: such inputs are refused).
    ``arrival_ns`` defaults to now (time.monotonic_ns()). ``raw``, when given, holds the raw
    input tensors in place of ``msg.raw_input_contents`` (wire.py keeps them out of ``msg``).
    """
    arrival = time.monotonic_ns() if arrival_ns is None else arrival_ns
    if raw is None:
        raw = msg.raw_input_contents
    raw_count = len(raw)
    raw_used = 0
    inputs: dict[str, Array] = {}
    for tensor in msg.inputs:
        name = tensor.name
        source = f"input '{name}'"
        if name in inputs:
            raise InvalidArgument(f"{source} appears more than once; send each input once")
        datatype = dtypes.lookup(tensor.datatype, source)
        shape = tuple(tensor.shape)
        if any(dim < 0 for dim in shape):
            raise InvalidArgument(
                f"{source} has shape {list(shape)} with a negative dimension; send the actual"
                " shape of the data (wildcards -1 belong in the model config only)"
            )
        region = _shared_memory_ref(tensor.parameters, source)
        has_contents = tensor.HasField("contents")
        if region is not None:
            if has_contents:
                raise InvalidArgument(
                    f"{source} names shared memory region '{region.region}' and also carries"
                    " contents; send the data one way only"
                )
            if shm is None:
                raise Unsupported(
                    f"{source} uses shared memory, which this endpoint does not offer"
                )
            buf = shm.read(region.region, region.offset, region.byte_size, tensor=name)
            where = f"shared memory region '{region.region}' (byte_size {region.byte_size})"
            inputs[name] = _from_buffer(datatype, shape, buf, source, where)
        elif has_contents:
            if raw_count:
                raise InvalidArgument(
                    f"{source} carries typed contents but the request also has"
                    " raw_input_contents; send all inputs raw or all as typed contents"
                )
            inputs[name] = _from_contents(datatype, shape, tensor.contents, source)
        else:
            if raw_used >= raw_count:
                raise InvalidArgument(
                    f"no data for {source}: the request has {raw_count} raw_input_contents"
                    " entries and none left for it; send one entry per input that is not in"
                    " shared memory, in input order"
                )
            where = f"raw_input_contents[{raw_used}]"
            inputs[name] = _from_buffer(datatype, shape, raw[raw_used], source, where)
            raw_used += 1
    if raw_used != raw_count:
        raise InvalidArgument(
            f"the request has {raw_count} raw_input_contents entries but only {raw_used}"
            f" inputs read raw data (model '{msg.model_name}'); send exactly one entry per"
            " input that is not in shared memory, in input order"
        )
    priority, timeout_us, parameters = _request_parameters(msg.parameters)
    return InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        inputs=inputs,
        outputs=_requested_outputs(msg.outputs),
        id=msg.id,
        priority=priority,
        timeout_us=timeout_us,
        parameters=parameters,
        arrival_ns=arrival,
    )


def encode_infer_response(resp: InferResponse) -> pb.ModelInferResponse:
    """Encode a response: every output's data in raw_output_contents, index-aligned."""
    msg = pb.ModelInferResponse(
        model_name=resp.model_name, model_version=resp.model_version, id=resp.id
    )
    for key, value in resp.parameters.items():
        _set_parameter(msg.parameters[key], value)
    raw: list[bytes] = []
    for out in resp.outputs:
        tensor = msg.outputs.add()
        tensor.name = out.name
        tensor.datatype = out.datatype
        tensor.shape.extend(out.data.shape)
        if out.shared_memory is not None:
            ref = out.shared_memory
            tensor.parameters[REGION].string_param = ref.region
            tensor.parameters[OFFSET].int64_param = ref.offset
            tensor.parameters[BYTE_SIZE].int64_param = ref.byte_size
            raw.append(b"")
        else:
            raw.append(dtypes.tensor_bytes(out.datatype, out.data))
    msg.raw_output_contents.extend(raw)
    return msg


def _from_buffer(
    datatype: DataType,
    shape: tuple[int, ...],
    buf: bytes | memoryview,
    source: str,
    where: str,
) -> Array:
    count = math.prod(shape)
    if datatype.byte_size == 0:
        return dtypes.deserialize_bytes(buf, count, source).reshape(shape)
    expected = count * datatype.byte_size
    got = buf.nbytes if isinstance(buf, memoryview) else len(buf)
    if got != expected:
        raise InvalidArgument(
            f"{source} ({datatype.name}, shape {list(shape)}) needs {expected} bytes but {where}"
            f" holds {got}; make the data match the shape and datatype"
        )
    return np.frombuffer(buf, dtype=datatype.numpy).reshape(shape)


def _from_contents(
    datatype: DataType, shape: tuple[int, ...], contents: pb.InferTensorContents, source: str
) -> Array:
    entry = _CONTENTS_FIELD.get(datatype.name)
    if entry is None:
        raise InvalidArgument(
            f"{source} is {datatype.name}, which has no typed contents field; send it in"
            " raw_input_contents (little-endian bytes)"
        )
    field, wire_dtype = entry
    for other in _ALL_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidArgument(
                f"{source} is {datatype.name} but its values are in contents.{other}; put them"
                f" in contents.{field}"
            )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"{source} has shape {list(shape)}, which needs {count} elements, but"
            f" contents.{field} holds {len(values)}; make the values match the shape"
        )
    if datatype.byte_size == 0:
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    decoded = np.fromiter(values, dtype=wire_dtype, count=count)
    # int_contents / uint_contents carry 8- and 16-bit values widened; keep the low bytes.
    return decoded.astype(datatype.numpy, copy=False).reshape(shape)


def _param_value(param: pb.InferParameter) -> ParamValue | None:
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        return None
    value: ParamValue = getattr(param, kind)
    return value


def _int_param(param: pb.InferParameter, what: str) -> int:
    value = _param_value(param)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{what} must be a non-negative int64_param or uint64_param")
    return value


def _shared_memory_ref(
    params: Mapping[str, pb.InferParameter], source: str
) -> SharedMemoryRef | None:
    if REGION not in params:
        if BYTE_SIZE in params or OFFSET in params:
            raise InvalidArgument(
                f"{source} has {BYTE_SIZE}/{OFFSET} but no {REGION}; name the region too"
            )
        return None
    region = _param_value(params[REGION])
    if not isinstance(region, str) or not region:
        raise InvalidArgument(f"{REGION} of {source} must be a non-empty string_param")
    if BYTE_SIZE not in params:
        raise InvalidArgument(f"{source} names {REGION} '{region}' but has no {BYTE_SIZE}")
    byte_size = _int_param(params[BYTE_SIZE], f"{BYTE_SIZE} of {source}")
    offset = _int_param(params[OFFSET], f"{OFFSET} of {source}") if OFFSET in params else 0
    return SharedMemoryRef(region=region, byte_size=byte_size, offset=offset)


def _requested_outputs(
    outputs: Iterable[pb.ModelInferRequest.InferRequestedOutputTensor],
) -> list[RequestedOutput]:
    result: list[RequestedOutput] = []
    seen: set[str] = set()
    for out in outputs:
        source = f"output '{out.name}'"
        if out.name in seen:
            raise InvalidArgument(f"{source} is requested more than once; ask for it once")
        seen.add(out.name)
        params = out.parameters
        region = _shared_memory_ref(params, source)
        classification = 0
        if CLASSIFICATION in params:
            classification = _int_param(params[CLASSIFICATION], f"{CLASSIFICATION} of {source}")
        if region is not None and classification:
            raise InvalidArgument(
                f"{source} asks for both {REGION} and {CLASSIFICATION}; choose one"
            )
        result.append(
            RequestedOutput(name=out.name, classification=classification, shared_memory=region)
        )
    return result


def _request_parameters(
    params: Mapping[str, pb.InferParameter],
) -> tuple[int, int, dict[str, ParamValue]]:
    priority = 0
    timeout_us = 0
    rest: dict[str, ParamValue] = {}
    for key, param in params.items():
        if key == "priority":
            priority = _int_param(param, "request parameter 'priority'")
        elif key == "timeout":
            timeout_us = _int_param(param, "request parameter 'timeout' (microseconds)")
        else:
            value = _param_value(param)
            if value is not None:
                rest[key] = value
    return priority, timeout_us, rest


def _set_parameter(param: pb.InferParameter, value: ParamValue) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if value > np.iinfo(np.int64).max:
            param.uint64_param = value
        else:
            param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = value
