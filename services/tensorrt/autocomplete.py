"""Plan auto-complete and config checks: the config's tensors against the engine's IO.

``TensorrtRuntime.autocomplete`` (called by services/core before it validates a config) reads the
engine's IO (services/tensorrt/engine.read_io) and applies Triton's auto-complete rules
(services/core/autocomplete.complete_io). When those rules would pick the default
``max_batch_size`` (every tensor has a dynamic first dimension), the value comes instead from the
largest first dimension optimization profile 0 allows, as Triton does for TensorRT plans.
``check_config`` verifies at load that the completed config and the engine agree, with messages
that say what to write.
"""

from __future__ import annotations

from typing import Any

from protos.gen.inference import model_config_pb2 as mc
from services.core.autocomplete import check_shape, complete_io, default_max_batch_size
from services.core.errors import ModelLoadError
from services.tensorrt.engine import EngineIO, EngineTensor
from services.tensorrt.profiles import profile_max_batch

PLATFORM = "tensorrt_plan"
BACKEND = "tensorrt"


def complete_config(config: mc.ModelConfig, io: EngineIO) -> None:
    """Fill what ``config`` leaves out from the engine's IO (module docstring), in place."""
    user_batch = config.max_batch_size
    had_scheduler = config.WhichOneof("scheduling_choice") is not None
    complete_io(config, io.inputs, io.outputs, platform=PLATFORM, backend=BACKEND)
    if user_batch != 0 or config.max_batch_size != default_max_batch_size():
        return
    largest = profile_max_batch(io, 0)
    if largest is None or largest < 1:
        return
    config.max_batch_size = largest
    if largest == 1 and not had_scheduler:
        config.ClearField("dynamic_batching")


def _check_tensor(model: str, kind: str, io: Any, tensor: EngineTensor, batching: bool) -> None:
    if io.data_type != tensor.data_type:
        raise ModelLoadError(
            f"model '{model}': config gives {kind} '{io.name}' data_type "
            f"{mc.DataType.Name(io.data_type)} but the engine declares "
            f"{mc.DataType.Name(tensor.data_type)}; write data_type: "
            f"{mc.DataType.Name(tensor.data_type)}"
        )
    check_shape(
        model,
        kind,
        io,
        tensor,
        tensor.shape,
        batching,
        where="the engine",
        batch_fix="build the engine with a dynamic batch dimension",
    )


def check_config(config: mc.ModelConfig, io: EngineIO) -> None:
    """ModelLoadError unless every config tensor is an engine tensor of the same type and shape."""
    model = config.name
    batching = config.max_batch_size > 0
    for kind, written, find in (
        ("input", config.input, io.input),
        ("output", config.output, io.output),
    ):
        for entry in written:
            tensor = find(entry.name)
            if tensor is None:
                names = [t.name for t in (io.inputs if kind == "input" else io.outputs)]
                raise ModelLoadError(
                    f"model '{model}': config {kind} '{entry.name}' is not an {kind} of the "
                    f"engine (its {kind}s: {names}); rename it in config.pbtxt"
                )
            _check_tensor(model, kind, entry, tensor, batching)
    declared = {entry.name for entry in config.input}
    missing = [t.name for t in io.inputs if t.name not in declared]
    if missing:
        raise ModelLoadError(
            f"model '{model}': the engine needs input(s) {missing} that config.pbtxt does not "
            "declare; add them (or leave input out entirely to have it filled in)"
        )
