"""Tensors between the serving kit and torch: config datatypes ⇄ torch dtypes, numpy ⇄ torch.

Used by services/torch/runtime.py on every batch. Conversions share memory where they can:
``torch.from_numpy`` on the way in and ``Tensor.numpy()`` on the way out (CPU tensors). BF16
travels in the kit as raw 16-bit values (numpy dtype "V2"); it is reinterpreted as
``torch.bfloat16`` with a view, never converted through float. UINT16/32/64 map to torch's
``uint16``/``uint32``/``uint64`` (torch >= 2.3: they cross ``from_numpy``/``numpy()`` unchanged,
though torch implements few operators on them, so a model usually casts them first). BYTES
(TYPE_STRING) has no torch tensor type, so configs declaring it fail to load with a message
naming the tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from protos.gen.inference import model_config_pb2 as mc
from services.core.dtypes import BF16_DTYPE
from services.core.requests import Array

#: config datatype → torch dtype, for every datatype this family can exchange
CONFIG_TO_TORCH: dict[int, torch.dtype] = {
    mc.TYPE_BOOL: torch.bool,
    mc.TYPE_UINT8: torch.uint8,
    mc.TYPE_UINT16: torch.uint16,
    mc.TYPE_UINT32: torch.uint32,
    mc.TYPE_UINT64: torch.uint64,
    mc.TYPE_INT8: torch.int8,
    mc.TYPE_INT16: torch.int16,
    mc.TYPE_INT32: torch.int32,
    mc.TYPE_INT64: torch.int64,
    mc.TYPE_FP16: torch.float16,
    mc.TYPE_FP32: torch.float32,
    mc.TYPE_FP64: torch.float64,
    mc.TYPE_BF16: torch.bfloat16,
}
TORCH_TO_CONFIG: dict[torch.dtype, int] = {v: k for k, v in CONFIG_TO_TORCH.items()}

_SUPPORTED = ", ".join(mc.DataType.Name(t) for t in CONFIG_TO_TORCH)


def unsupported_reason(data_type: int) -> str | None:
    """Why a config datatype cannot be served by this family, or None when it can."""
    if data_type in CONFIG_TO_TORCH:
        return None
    name = mc.DataType.Name(data_type) if data_type in mc.DataType.values() else str(data_type)
    if data_type == mc.TYPE_STRING:
        return (
            f"{name} (BYTES) has no torch tensor type; pre-process strings in a Python model "
            f"or an ensemble step and pass numbers ({_SUPPORTED})"
        )
    return f"{name} is not supported by the torch service; use one of {_SUPPORTED}"


def to_torch(array: Array, device: torch.device) -> torch.Tensor:
    """A kit array as a torch tensor on ``device``; no copy for writable, C-contiguous CPU input.

    Arrays decoded straight from a request buffer are read-only; torch tensors are always
    writable and a model may update its input in place, so those are copied first.
    """
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C", copy=True)
    if array.dtype == BF16_DTYPE:
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    if device.type != "cpu":
        tensor = tensor.to(device, non_blocking=False)
    return tensor


def to_numpy(tensor: torch.Tensor) -> Array:
    """A torch result as a kit array (BF16 as raw "V2" values); shares memory for CPU tensors."""
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BF16_DTYPE)
    return tensor.numpy()
