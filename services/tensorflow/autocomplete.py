"""SavedModel auto-complete and config checks: the config's tensors against the signature's.

``TensorflowRuntime.autocomplete`` (called by services/core before it validates a config) fills
what config.pbtxt leaves out from the chosen signature, following Triton's TensorFlow backend
(and services/onnx/autocomplete.py, which follows the same Triton rules):

- inputs: every signature input missing from the config is added; outputs: all of them when the
  config lists none (a config that lists some outputs chose a subset, which is kept);
- a tensor the user named but left without ``data_type`` / ``dims`` gets them from the signature;
- ``max_batch_size``: the user's value when set (> 0); otherwise, when every signature input and
  output has a dynamic first dimension (and no user-written dims say otherwise), Triton's default
  of 4, with ``dynamic_batching`` when no scheduler is configured; otherwise 0 (no batching);
- dims leave out the batch dimension when batching; unknown dimensions become -1;
- ``platform`` / ``backend`` are filled only where empty.
Nothing the user wrote is overwritten. ``check_config`` then verifies, at load, that the
(completed) config and the signature agree, with messages that say what to write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError
from services.tensorflow.signature import Signature, SignatureTensor, unsupported_reason

PLATFORM = "tensorflow_savedmodel"
BACKEND = "tensorflow"
#: Triton's --backend-config=tensorflow,default-max-batch-size default
DEFAULT_MAX_BATCH_SIZE = 4


def _user_batching_hint(config: mc.ModelConfig, tensors: Sequence[SignatureTensor]) -> bool | None:
    """What user-written dims imply: True (one shorter than the model: batching), False, None."""
    by_name = {t.name: t for t in tensors}
    written: list[Any] = [*config.input, *config.output]
    for io in written:
        tensor = by_name.get(io.name)
        if tensor is None or tensor.shape is None or not io.dims or io.HasField("reshape"):
            continue
        if len(io.dims) == len(tensor.shape):
            return False
        if len(io.dims) == len(tensor.shape) - 1:
            return True
    return None


def _fill(io: Any, tensor: SignatureTensor, batching: bool) -> None:
    if io.data_type == mc.TYPE_INVALID:
        io.data_type = tensor.data_type
    if not io.dims and not io.HasField("reshape") and tensor.shape is not None:
        io.dims.extend(tensor.dims(batching))


def complete_config(config: mc.ModelConfig, signature: Signature) -> None:
    """Apply the auto-complete rules (module docstring) to ``config`` in place."""
    if not config.platform and not config.backend:
        config.platform = PLATFORM
        config.backend = BACKEND
    elif not config.backend and config.platform == PLATFORM:
        config.backend = BACKEND

    everything = [*signature.inputs, *signature.outputs]
    if config.max_batch_size == 0:
        can_batch = all(t.batchable for t in everything)
        if can_batch and _user_batching_hint(config, everything) is not False:
            config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    batching = config.max_batch_size > 0
    if config.max_batch_size > 1 and config.WhichOneof("scheduling_choice") is None:
        config.dynamic_batching.SetInParent()

    named_inputs = {io.name: io for io in config.input}
    for tensor in signature.inputs:
        model_input = named_inputs.get(tensor.name)
        if model_input is None:
            model_input = config.input.add(name=tensor.name)
        _fill(model_input, tensor, batching)

    if not config.output:
        for tensor in signature.outputs:
            config.output.add(name=tensor.name)
    outputs = {t.name: t for t in signature.outputs}
    for io in config.output:
        if io.name in outputs:
            _fill(io, outputs[io.name], batching)


def _check_tensor(model: str, kind: str, io: Any, tensor: SignatureTensor, batching: bool) -> None:
    """The config's view of one tensor must agree with the signature's."""
    reason = unsupported_reason(tensor)
    if reason is not None:
        raise ModelLoadError(f"model '{model}': {kind} '{io.name}' is {reason}")
    if io.data_type != tensor.data_type:
        raise ModelLoadError(
            f"model '{model}': config gives {kind} '{io.name}' data_type "
            f"{mc.DataType.Name(io.data_type)} but the signature declares {tensor.tf_type}; "
            f"write data_type: {mc.DataType.Name(tensor.data_type)}"
        )
    if tensor.shape is None:
        return
    if batching and not tensor.batchable:
        raise ModelLoadError(
            f"model '{model}': max_batch_size > 0 needs a dynamic first dimension, but {kind} "
            f"'{io.name}' has shape {list(tensor.shape)} in the signature; set max_batch_size: 0 "
            "and give the full dims, or save the model with a None batch dimension"
        )
    if io.HasField("reshape"):
        return
    expected = ([-1] if batching else []) + list(io.dims)
    actual = list(tensor.shape)
    compatible = len(expected) == len(actual) and all(
        e == a or e == -1 or a == -1 for e, a in zip(expected, actual, strict=True)
    )
    if not compatible:
        raise ModelLoadError(
            f"model '{model}': config dims {list(io.dims)} of {kind} '{io.name}' do not match "
            f"shape {actual} in the signature (max_batch_size "
            f"{'> 0 adds' if batching else '0 adds no'} a batch dimension); write dims: "
            f"{tensor.dims(batching)}"
        )


def check_config(config: mc.ModelConfig, signature: Signature) -> None:
    """Every signature input is in the config, every config tensor in the signature; they agree."""
    model = config.name
    batching = config.max_batch_size > 0
    for kind, declared, actual in (
        ("input", config.input, signature.inputs),
        ("output", config.output, signature.outputs),
    ):
        by_name = {t.name: t for t in actual}
        for io in declared:
            tensor = by_name.get(io.name)
            if tensor is None:
                raise ModelLoadError(
                    f"model '{model}': config {kind} '{io.name}' is not an {kind} of signature "
                    f"'{signature.name}', whose {kind}s are {sorted(by_name)}"
                )
            _check_tensor(model, kind, io, tensor, batching)
    missing = sorted({t.name for t in signature.inputs} - {io.name for io in config.input})
    if missing:
        raise ModelLoadError(
            f"model '{model}': signature '{signature.name}' needs inputs {missing} that "
            "config.pbtxt does not declare; add them to 'input' (or remove 'input' to let "
            "auto-complete fill it)"
        )
