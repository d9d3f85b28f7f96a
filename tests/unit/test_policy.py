"""Traffic policy validation and persistence across restarts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from control_plane.policy import PolicyError, PolicyStore, parse_weights


def test_parse_weights_normalises_and_validates() -> None:
    assert parse_weights("m", {"2": 10, "01": 90}) == {"1": 90, "2": 10}
    for bad, words in (
        ({}, "names no version"),
        ({"x": 1}, "not a positive integer"),
        ({"0": 1}, "not a positive integer"),
        ({"1": -1}, ">= 0"),
        ({"1": 1.5}, ">= 0"),
        ({"1": True}, ">= 0"),
        ({"1": 0, "2": 0}, "add up to 0"),
    ):
        with pytest.raises(PolicyError, match=re.escape(words)):
            parse_weights("m", bad)


def test_policies_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "policies.json"
    store = PolicyStore(path)
    store.set_split("simple", {"1": 90, "2": 10})
    store.set_split("mlp", {"3": 1})
    store.clear_split("mlp")
    again = PolicyStore(path)
    assert dict(again.all()["simple"].weights) == {"1": 90, "2": 10}
    assert "mlp" not in again.all()


def test_corrupt_policy_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    path.write_text("{not json")
    with pytest.raises(PolicyError, match=r"policies\.json"):
        PolicyStore(path)


def test_weights_beyond_what_envoy_takes_are_refused() -> None:
    with pytest.raises(PolicyError, match="more than Envoy accepts"):
        parse_weights("m", {"1": 2**32, "2": 1})
    with pytest.raises(PolicyError, match="more than Envoy accepts"):
        parse_weights("m", {"1": 2**32 - 1, "2": 1})
    assert parse_weights("m", {"1": 2**32 - 2, "2": 1}) == {"1": 2**32 - 2, "2": 1}
