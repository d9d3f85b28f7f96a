"""Traffic policy validation and persistence across restarts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from control_plane.model import Mirror
from control_plane.policy import PolicyError, PolicyStore, parse_mirror, parse_weights


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


def test_parse_mirror_normalises_and_validates() -> None:
    assert parse_mirror("m", "02", 12.5) == Mirror("2", 12.5)
    assert parse_mirror("m", 3, 100) == Mirror("3", 100.0)
    assert parse_mirror("m", "1", 0.0001) == Mirror("1", 0.0001)
    for version, percent, words in (
        ("x", 10, "not a positive integer"),
        ("0", 10, "not a positive integer"),
        (-1, 10, "not a positive integer"),
        (True, 10, "not a positive integer"),
        (None, 10, "not a positive integer"),
        (1.5, 10, "not a positive integer"),
        ("\u00b2", 10, "not a positive integer"),
        ("2", 0, "in (0, 100]"),
        ("2", -5, "in (0, 100]"),
        ("2", 100.5, "in (0, 100]"),
        ("2", float("nan"), "in (0, 100]"),
        ("2", float("inf"), "in (0, 100]"),
        ("2", "10", "must be a number"),
        ("2", True, "must be a number"),
        ("2", 0.00001, "finest share"),
    ):
        with pytest.raises(PolicyError, match=re.escape(words)):
            parse_mirror("m", version, percent)


def test_mirrors_survive_a_restart_beside_splits(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    store = PolicyStore(path)
    store.set_split("simple", {"1": 90, "2": 10})
    assert store.set_mirror("simple", "2", 12.5) == Mirror("2", 12.5)
    store.set_mirror("mlp", 3, 100)
    assert json.loads(path.read_text()) == {
        "splits": {"simple": {"1": 90, "2": 10}},
        "mirrors": {
            "mlp": {"version": "3", "percent": 100.0},
            "simple": {"version": "2", "percent": 12.5},
        },
    }
    again = PolicyStore(path).all()
    assert dict(again["simple"].weights) == {"1": 90, "2": 10}
    assert again["simple"].mirror == Mirror("2", 12.5)
    assert not again["mlp"].weights and again["mlp"].mirror == Mirror("3", 100.0)


def test_clearing_one_part_keeps_the_other(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    store = PolicyStore(path)
    store.set_split("simple", {"1": 1})
    store.set_mirror("simple", "2", 50)
    store.clear_split("simple")
    assert PolicyStore(path).all()["simple"].mirror == Mirror("2", 50.0)
    store.set_split("simple", {"1": 1})
    store.clear_mirror("simple")
    assert PolicyStore(path).all()["simple"].mirror is None
    store.clear_split("simple")
    store.clear_mirror("unknown")
    assert "simple" not in PolicyStore(path).all()


def test_a_refused_mirror_keeps_the_last_one() -> None:
    store = PolicyStore(None)
    store.set_mirror("simple", "2", 10)
    with pytest.raises(PolicyError):
        store.set_mirror("simple", "2", 0)
    assert store.all()["simple"].mirror == Mirror("2", 10.0)


def test_a_file_from_before_mirrors_loads(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    path.write_text(json.dumps({"splits": {"simple": {"1": 90, "2": 10}}}))
    policy = PolicyStore(path).all()["simple"]
    assert dict(policy.weights) == {"1": 90, "2": 10} and policy.mirror is None


@pytest.mark.parametrize("mirrors", [{"simple": {"version": "2"}}, {"simple": [2, 10]}])
def test_a_bad_stored_mirror_is_a_clear_error(tmp_path: Path, mirrors: object) -> None:
    path = tmp_path / "policies.json"
    path.write_text(json.dumps({"mirrors": mirrors}))
    with pytest.raises(PolicyError, match=r"policies\.json"):
        PolicyStore(path)
