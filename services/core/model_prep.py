"""Model preparation: which runtime serves a repository folder, the config it is loaded with, and
the instances its instance groups expand to.

Data flow: repository (a model's folder and config.pbtxt, or a load request's override) ─▶
``prepare_config`` (runtime chosen by platform, backend or model file; config auto-completed by
that runtime unless the service runs with --disable-auto-complete-config, defaulted, validated)
─▶ ModelManager (manager.py), which loads the versions with the runtime. ``serves`` tells which
repository folders hold models of this service's family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from protos.gen.inference import model_config_pb2 as mc
from services.core import config as cfg
from services.core import ragged
from services.core import repository as repo
from services.core.autocomplete import DEFAULT_MAX_BATCH_SIZE, batch_default
from services.core.errors import ModelLoadError, ServingError
from services.core.runtime import InstanceSpec, Runtime
from services.core.sequences import runtime_config


def serves(runtimes: Sequence[type[Runtime]], model_dir: repo.ModelDir) -> bool:
    """Whether a repository folder holds a model of this service's family (a config that
    does not parse counts as ours, so its error is reported)."""
    path = model_dir.path / "config.pbtxt"
    try:
        config = cfg.load_config_file(path) if path.exists() else mc.ModelConfig()
    except ServingError:
        return True
    return runtime_for(runtimes, config, model_dir) is not None


def runtime_for(
    runtimes: Sequence[type[Runtime]], config: mc.ModelConfig, model_dir: repo.ModelDir
) -> type[Runtime] | None:
    """The runtime for a model: by platform; else among the runtimes of its backend (all,
    with neither) the one whose model file the version folders hold."""
    if config.platform:
        return next((rt for rt in runtimes if config.platform in rt.platforms), None)
    candidates = [rt for rt in runtimes if not config.backend or rt.backend == config.backend]
    for rt in candidates:
        filename = config.default_model_filename or rt.default_model_filename
        if filename and any((p / filename).exists() for p in model_dir.versions.values()):
            return rt
    return candidates[0] if config.backend and candidates else None


def prepare_config(
    runtimes: Sequence[type[Runtime]],
    name: str,
    model_dir: repo.ModelDir,
    override: mc.ModelConfig | None,
    *,
    auto_complete: bool = True,
    default_max_batch_size: Callable[[str], int] | None = None,
) -> tuple[mc.ModelConfig, type[Runtime]] | None:
    """Read, auto-complete (unless ``auto_complete`` is False: Triton's
    --disable-auto-complete-config, where the config must be whole), default and validate the
    config; None if another family's model. ``default_max_batch_size(backend)``: the
    max_batch_size auto-complete gives a model that can batch (--backend-config; default 4)."""
    has_file = (model_dir.path / "config.pbtxt").exists()
    if override is not None:
        config = mc.ModelConfig()
        config.CopyFrom(override)
    elif has_file:
        config = cfg.load_config_file(model_dir.path / "config.pbtxt")
    else:
        config = mc.ModelConfig()
    if not config.name:
        config.name = name
    runtime = runtime_for(runtimes, config, model_dir)
    if runtime is None:
        return None
    if not auto_complete:
        _check_complete(config, name, has_file or override is not None)
    if model_dir.versions and (auto_complete or runtime.autocomplete_always):
        newest = model_dir.versions[max(model_dir.versions)]
        model_file = newest / (config.default_model_filename or runtime.default_model_filename)
        if model_file.exists():
            batch = (
                default_max_batch_size(runtime.backend)
                if default_max_batch_size
                else DEFAULT_MAX_BATCH_SIZE
            )
            try:
                with batch_default(batch):
                    runtime.autocomplete(config, model_file)
            except ServingError:
                raise
            except Exception as exc:
                raise ModelLoadError(
                    f"model '{name}': cannot read {model_file} to complete its config: {exc}"
                ) from exc
    if not config.platform and runtime.platforms:
        config.platform = runtime.platforms[0]
    if not config.backend:
        config.backend = runtime.backend
    cfg.apply_defaults(config)
    cfg.validate_config(config, name)
    return config, runtime


def _check_complete(config: mc.ModelConfig, name: str, has_config: bool) -> None:
    """With auto-complete off, a config must say itself what auto-complete would fill."""
    missing = [] if has_config else ["a config.pbtxt"]
    missing += [f"its {kind}s" for kind in ("input", "output") if not getattr(config, kind)]
    if missing:
        raise ModelLoadError(
            f"model '{name}': auto-complete is disabled (--disable-auto-complete-config), so the "
            f"config must list everything the model needs; it lacks {' and '.join(missing)} "
            "(with name, data_type and dims of each tensor, and max_batch_size if it batches)"
        )


def instance_specs(config: mc.ModelConfig) -> list[InstanceSpec]:
    """Expand instance_group entries into one spec per instance (Triton's instance naming)."""
    specs: list[InstanceSpec] = []
    for g_index, group in enumerate(config.instance_group):
        name = group.name or f"{config.name}_{g_index}"
        devices = list(group.gpus) if group.kind == mc.ModelInstanceGroup.KIND_GPU else [-1]
        for device in devices or [0]:
            for i in range(max(group.count, 1)):
                specs.append(
                    InstanceSpec(
                        name=f"{name}_{i}",
                        kind=group.kind,
                        device_id=device,
                        index=len(specs),
                        group=g_index,
                    )
                )
    return specs or [InstanceSpec(name=f"{config.name}_0", kind=mc.ModelInstanceGroup.KIND_CPU)]


def loaded_config(config: mc.ModelConfig, runtime_cls: type[Runtime]) -> mc.ModelConfig:
    """The config ``runtime_cls`` loads a model version with: a stateful model's control inputs
    and state declared as inputs and outputs (for runtimes that take them so), ragged inputs and
    batch inputs as the runtime sees them (services/core/ragged.py)."""
    loaded = runtime_config(config) if runtime_cls.declares_sequence_io else config
    if runtime_cls.takes_request_list or runtime_cls.async_execution:
        if config.batch_input or config.batch_output:
            raise ModelLoadError(
                f"model '{config.name}': the {runtime_cls.backend} backend gets each request "
                "on its own, so batch_input and batch_output do not apply to it; remove them "
                "(allow_ragged_batch alone is fine)"
            )
        return loaded
    return ragged.runtime_view(loaded)
