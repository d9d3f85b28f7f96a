"""``pb_utils.ModelConfig`` and ``auto_complete_config`` (services/python/auto_complete.py)."""

from __future__ import annotations

from typing import Any

import pytest

from protos.gen.inference import model_config_pb2 as mc
from services.core import config as cfg
from services.core.errors import ModelLoadError
from services.python import triton_python_backend_utils as pb_utils
from services.python.auto_complete import ModelConfig, complete

IN0 = {"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4], "optional": True}
OUT0 = {"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}


def config_from(text: str) -> mc.ModelConfig:
    return cfg.parse_config_text(text, "config.pbtxt")


class Declaring:
    """A model class that declares everything Triton's example declares."""

    @staticmethod
    def auto_complete_config(auto_complete_model_config: Any) -> Any:
        config = auto_complete_model_config.as_dict()
        names = {i["name"] for i in config["input"]}
        if "INPUT0" not in names:
            auto_complete_model_config.add_input(IN0)
        auto_complete_model_config.add_output(OUT0)
        auto_complete_model_config.set_max_batch_size(4)
        auto_complete_model_config.set_dynamic_batching()
        auto_complete_model_config.set_model_transaction_policy({"decoupled": False})
        return auto_complete_model_config


def test_an_empty_config_takes_what_the_model_declares() -> None:
    config = mc.ModelConfig(name="m", backend="python")
    complete(config, Declaring)
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("INPUT0", mc.TYPE_FP32, [4], True)
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("OUTPUT0", [4])]
    assert config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    assert config.name == "m" and config.backend == "python"


def test_what_the_config_says_is_kept() -> None:
    config = config_from(
        'name: "m" backend: "python" max_batch_size: 2 '
        'input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [4] }] '
        "dynamic_batching { max_queue_delay_microseconds: 300 }"
    )
    complete(config, Declaring)
    assert config.max_batch_size == 2  # smaller than the model's 4: the user's choice
    assert config.dynamic_batching.max_queue_delay_microseconds == 300
    assert [i.name for i in config.input] == ["INPUT0"]
    assert not config.input[0].optional  # the config's entry stays as written


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('name: "m" backend: "python" max_batch_size: 8', "max_batch_size 8, more than the 4"),
        (
            'name: "m" backend: "python" output [{ name: "OUTPUT0" data_type: TYPE_INT32 '
            "dims: [4] }]",
            "output 'OUTPUT0': the configuration has data_type TYPE_INT32",
        ),
        (
            'name: "m" backend: "python" output [{ name: "OUTPUT0" data_type: TYPE_FP32 '
            "dims: [5] }]",
            "output 'OUTPUT0': the configuration has dims [5]",
        ),
        (
            'name: "m" backend: "python" model_transaction_policy { decoupled: true }',
            "decoupled True, auto_complete_config sets False",
        ),
    ],
)
def test_a_contradiction_fails_the_load_naming_the_model(text: str, reason: str) -> None:
    with pytest.raises(ModelLoadError, match="model 'm': auto_complete_config raised") as info:
        complete(config_from(text), Declaring)
    assert reason in str(info.value)


def test_without_the_method_nothing_changes() -> None:
    config = mc.ModelConfig(name="m", backend="python", max_batch_size=3)
    before = config.SerializeToString()
    complete(config, type("Plain", (), {}))
    complete(config, None)
    assert config.SerializeToString() == before


def test_the_model_must_return_the_config_object() -> None:
    class Forgets:
        @staticmethod
        def auto_complete_config(c: Any) -> None:
            c.set_max_batch_size(1)

    with pytest.raises(ModelLoadError, match=r"must return the pb_utils\.ModelConfig"):
        complete(mc.ModelConfig(name="m"), Forgets)


def test_the_completed_config_must_be_a_model_config() -> None:
    class Nonsense:
        @staticmethod
        def auto_complete_config(c: Any) -> Any:
            c.add_input({"name": "X", "data_type": "TYPE_NOPE", "dims": [1]})
            return c

    with pytest.raises(ModelLoadError, match="is not a model config"):
        complete(mc.ModelConfig(name="m"), Nonsense)


def test_model_config_checks_its_arguments() -> None:
    c = pb_utils.ModelConfig({"name": "m"})
    with pytest.raises(ValueError, match="must be an integer"):
        c.set_max_batch_size("4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0 or more"):
        c.set_max_batch_size(-1)
    with pytest.raises(ValueError, match=r"has no \['dims'\]"):
        c.add_input({"name": "X", "data_type": "TYPE_FP32"})
    with pytest.raises(ValueError, match="only 'decoupled'"):
        c.set_model_transaction_policy({"decoupled": True, "other": 1})
    with pytest.raises(ValueError, match="'name'"):
        c.add_model_warmup({"batch_size": 1})
    c.add_model_warmup({"name": "w", "batch_size": 1})
    assert c.as_dict()["model_warmup"] == [{"name": "w", "batch_size": 1}]


def test_as_dict_is_a_copy() -> None:
    c = ModelConfig({"name": "m"})
    c.as_dict()["input"].append(IN0)
    assert c.as_dict()["input"] == []


def test_a_config_entry_without_dims_gets_the_models() -> None:
    c = ModelConfig({"name": "m", "input": [{"name": "INPUT0", "data_type": "TYPE_FP32"}]})
    c.add_input(IN0)
    assert c.as_dict()["input"] == [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}]


def test_dynamic_batching_is_refused_beside_sequence_batching() -> None:
    c = ModelConfig({"name": "m", "sequence_batching": {"max_sequence_idle_microseconds": 5}})
    with pytest.raises(ValueError, match="sequence_batching"):
        c.set_dynamic_batching()
