"""Optimization profiles: which ones an instance may use, and which one fits a request's shapes.

An engine built with dynamic shapes carries one or more optimization profiles, each giving every
input a min/opt/max shape. As in Triton, ``instance_group { profile: ["1", "2"] }`` lists the
profiles (by index, as strings) the instances of that group may use; a group that lists none uses
profile 0. Each instance owns one execution context (services/tensorrt/runtime.py); per batch it
uses the first of its profiles whose ranges admit every input shape, switching the context's
active profile when that changes. A batch no profile admits is refused with InvalidArgument
naming the tensor and the allowed range. Everything here is pure (no TensorRT).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import InvalidArgument, ModelLoadError
from services.core.runtime import InstanceSpec
from services.tensorrt.engine import EngineIO, ProfileRange, Shape


def group_of(config: mc.ModelConfig, instance: InstanceSpec) -> mc.ModelInstanceGroup | None:
    """The instance group ``instance`` was expanded from (model_prep.instance_specs)."""
    return config.instance_group[instance.group] if instance.group >= 0 else None


def instance_profiles(
    config: mc.ModelConfig, instance: InstanceSpec, num_profiles: int
) -> tuple[int, ...]:
    """The profile indices this instance may use, from its group's ``profile`` strings."""
    group = group_of(config, instance)
    listed = list(group.profile) if group is not None else []
    if not listed:
        return (0,)
    where = f"model '{config.name}': instance group '{group.name if group else ''}'"
    chosen: list[int] = []
    for text in listed:
        try:
            index = int(text.strip())
        except ValueError:
            index = -1
        if not 0 <= index < num_profiles:
            raise ModelLoadError(
                f"{where} lists profile {text!r}, but the engine has {num_profiles} optimization "
                f"profile(s); write indices between 0 and {num_profiles - 1}"
            )
        if index not in chosen:
            chosen.append(index)
    return tuple(chosen)


def shape_problem(name: str, shape: Shape, allowed: ProfileRange, profile: int) -> str | None:
    """Why ``shape`` is outside ``allowed`` for input ``name``, or None when it fits."""
    low, high = allowed.min, allowed.max
    fits = len(shape) == len(low) and all(
        lo <= dim <= hi for dim, lo, hi in zip(shape, low, high, strict=True)
    )
    if fits:
        return None
    return (
        f"input '{name}' has shape {list(shape)} but optimization profile {profile} of the "
        f"engine accepts shapes from {list(low)} to {list(high)}"
    )


def check_shape(name: str, shape: Shape, allowed: ProfileRange, profile: int) -> None:
    """Raise InvalidArgument when ``shape`` is outside the profile's min/max for ``name``."""
    problem = shape_problem(name, shape, allowed, profile)
    if problem is not None:
        raise InvalidArgument(f"{problem}; send a shape within that range")


def choose_profile(io: EngineIO, profiles: Sequence[int], shapes: Mapping[str, Shape]) -> int:
    """The first of ``profiles`` whose ranges admit every input shape; InvalidArgument if none."""
    problems: list[str] = []
    for profile in profiles:
        first_problem = None
        for tensor in io.inputs:
            shape = shapes.get(tensor.name)
            if shape is None:
                continue
            first_problem = shape_problem(tensor.name, shape, tensor.profiles[profile], profile)
            if first_problem is not None:
                break
        if first_problem is None:
            return profile
        problems.append(first_problem)
    if len(problems) == 1:
        raise InvalidArgument(f"{problems[0]}; send a shape within that range")
    raise InvalidArgument(
        "no optimization profile of this instance accepts the request: "
        + "; ".join(problems)
        + "; send shapes within one profile's range"
    )


def profile_max_batch(io: EngineIO, profile: int = 0) -> int | None:
    """The largest batch every input admits under ``profile``; None unless all are batchable."""
    if not io.inputs or not all(t.batchable for t in io.inputs):
        return None
    return min(t.profiles[profile].max[0] for t in io.inputs)
