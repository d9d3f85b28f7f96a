"""SavedModel auto-complete and config checks: the config's tensors against the signature's.

``TensorflowRuntime.autocomplete`` (called by services/core before it validates a config) reads
the chosen signature and applies Triton's auto-complete rules (services/core/autocomplete.py).
``check_config`` then verifies, at load, that the (completed) config and the signature agree,
with messages that say what to write.
"""

from __future__ import annotations

from typing import Any

from protos.gen.inference import model_config_pb2 as mc
from services.core.autocomplete import check_shape, complete_io
from services.core.errors import ModelLoadError
from services.tensorflow.signature import Signature, SignatureTensor, unsupported_reason

PLATFORM = "tensorflow_savedmodel"
BACKEND = "tensorflow"


def complete_config(config: mc.ModelConfig, signature: Signature) -> None:
    """Apply Triton's auto-complete rules (services/core/autocomplete.py) to ``config``."""
    complete_io(config, signature.inputs, signature.outputs, platform=PLATFORM, backend=BACKEND)


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
    check_shape(
        model,
        kind,
        io,
        tensor,
        tensor.shape,
        batching,
        where="the signature",
        batch_fix="save the model with a None batch dimension",
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
