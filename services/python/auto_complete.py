"""``TritonPythonModel.auto_complete_config``: a Python model completing its own config.

Triton calls the model's static ``auto_complete_config(auto_complete_model_config)`` once while
loading, before ``initialize``, so a model.py can declare its inputs, outputs, max_batch_size,
dynamic batching, warm-up and transaction policy and load with a minimal config.pbtxt, or none.
Here the Python runtime's ``autocomplete`` hook (services/python/runtime.py, called by
services/core/model_prep.py before the config is validated) imports the model file, and when its
class has the method, calls it with a :class:`ModelConfig` built from the config so far and
takes the returned object's config as the model's.

:class:`ModelConfig` is ``pb_utils.ModelConfig``. What the user wrote wins or must agree: an input
or output the config already has keeps its entry, and a datatype or dims there that differ from
the model's is an error; the config's max_batch_size may be smaller than the model's (not
larger); a decoupled policy may not contradict the config's. Errors raise ``ValueError`` and
fail the load with the model's name and the reason.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from google.protobuf import json_format

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError
from services.core.http_json import message_to_json

#: the keys ``add_input`` / ``add_output`` need
_REQUIRED = ("name", "data_type", "dims")


def model_config_json(config: mc.ModelConfig) -> str:
    """The config as Triton gives it to Python models: proto field names, every field present,
    64-bit integers as numbers."""
    return json.dumps(message_to_json(config))


class ModelConfig:
    """The model's config while ``auto_complete_config`` completes it (Triton's class)."""

    def __init__(self, model_config: str | dict[str, Any]) -> None:
        self._config: dict[str, Any] = (
            json.loads(model_config) if isinstance(model_config, str) else model_config
        )
        self._config.setdefault("input", [])
        self._config.setdefault("output", [])
        self._config.setdefault("max_batch_size", 0)

    def as_dict(self) -> dict[str, Any]:
        """A copy of the config as a dictionary (changing it changes nothing)."""
        return copy.deepcopy(self._config)

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """The largest batch the model takes (0: it does not batch). A config that already says
        a non-zero max_batch_size keeps it when it is not larger than this."""
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
            raise ValueError(f"max_batch_size must be an integer, got {max_batch_size!r}")
        if max_batch_size < 0:
            raise ValueError(f"max_batch_size must be 0 or more, got {max_batch_size}")
        current = int(self._config.get("max_batch_size") or 0)
        if current > max_batch_size:
            raise ValueError(
                f"the configuration sets max_batch_size {current}, more than the "
                f"{max_batch_size} auto_complete_config allows for this model"
            )
        if current == 0:
            self._config["max_batch_size"] = max_batch_size

    def set_dynamic_batching(self) -> None:
        """Batch requests dynamically with the default settings (if the config says nothing)."""
        if self._config.get("sequence_batching"):
            raise ValueError(
                "set_dynamic_batching: the configuration already has sequence_batching"
            )
        if not self._config.get("dynamic_batching"):
            self._config["dynamic_batching"] = {}

    def add_input(self, input: dict[str, Any]) -> None:
        """Declare an input ({"name", "data_type", "dims", optional "optional", ...})."""
        self._add("input", input)

    def add_output(self, output: dict[str, Any]) -> None:
        """Declare an output ({"name", "data_type", "dims", ...})."""
        self._add("output", output)

    def add_model_warmup(self, model_warmup: dict[str, Any]) -> None:
        """Add a warm-up sample (a ModelWarmup as a dictionary)."""
        if not isinstance(model_warmup, dict) or not model_warmup.get("name"):
            raise ValueError("add_model_warmup needs a dictionary with a 'name'")
        self._config.setdefault("model_warmup", []).append(copy.deepcopy(model_warmup))

    def set_model_transaction_policy(self, transaction_policy_dict: dict[str, Any]) -> None:
        """Set the transaction policy; only ``{"decoupled": bool}`` is known."""
        if not isinstance(transaction_policy_dict, dict):
            raise ValueError("set_model_transaction_policy needs a dictionary")
        unknown = sorted(set(transaction_policy_dict) - {"decoupled"})
        if unknown:
            raise ValueError(
                f"set_model_transaction_policy: unknown keys {unknown}; only 'decoupled' is known"
            )
        decoupled = bool(transaction_policy_dict.get("decoupled", False))
        current = self._config.get("model_transaction_policy") or {}
        if "decoupled" in current and bool(current["decoupled"]) != decoupled:
            raise ValueError(
                f"the configuration sets decoupled {bool(current['decoupled'])}, "
                f"auto_complete_config sets {decoupled}"
            )
        self._config["model_transaction_policy"] = {"decoupled": decoupled}

    def _add(self, kind: str, tensor: dict[str, Any]) -> None:
        if not isinstance(tensor, dict):
            raise ValueError(f"add_{kind} needs a dictionary, got {type(tensor).__name__}")
        missing = [key for key in _REQUIRED if key not in tensor]
        if missing:
            raise ValueError(f"add_{kind}: {tensor.get('name', '?')!r} has no {missing}")
        name = tensor["name"]
        for existing in self._config[kind]:
            if existing.get("name") != name:
                continue
            for key in ("data_type", "dims"):
                theirs, ours = existing.get(key), tensor[key]
                if key == "dims" and theirs is not None:
                    theirs, ours = [int(d) for d in theirs], [int(d) for d in ours]
                if theirs in (None, "", "TYPE_INVALID", []):
                    existing[key] = copy.deepcopy(tensor[key])
                elif theirs != ours:
                    raise ValueError(
                        f"{kind} '{name}': the configuration has {key} {theirs}, "
                        f"auto_complete_config says {ours}"
                    )
            return
        self._config[kind].append(copy.deepcopy(tensor))


def complete(config: mc.ModelConfig, model_class: object) -> None:
    """Run ``model_class.auto_complete_config`` (if it has one) on ``config``, in place."""
    hook = getattr(model_class, "auto_complete_config", None)
    if hook is None:
        return
    name = config.name
    try:
        result = hook(ModelConfig(model_config_json(config)))
    except Exception as exc:
        raise ModelLoadError(
            f"model '{name}': auto_complete_config raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(result, ModelConfig):
        raise ModelLoadError(
            f"model '{name}': auto_complete_config must return the pb_utils.ModelConfig it was "
            f"given, got {type(result).__name__}"
        )
    completed = mc.ModelConfig()
    try:
        json_format.ParseDict(result.as_dict(), completed)
    except json_format.ParseError as exc:
        raise ModelLoadError(
            f"model '{name}': the config auto_complete_config made is not a model config: {exc}"
        ) from exc
    config.CopyFrom(completed)
