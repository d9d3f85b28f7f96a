"""Triton's TraceSetting semantics as services/core/trace_settings.py keeps them: updates and
clearing per scope, rate, count (once per trace in the mesh), parent decisions, bad updates, and
the HTTP JSON forms. Pure Python: no OpenTelemetry SDK (test_tracing.py checks the sampler on one).
"""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.core.trace_settings import (
    TraceSettings,
    TraceSettingsStore,
    settings_to_json,
    updates_from_json,
)


def decide(store: TraceSettingsStore, model: str = "", **parent: bool) -> bool:
    return store.should_sample(
        model,
        parent_valid=parent.get("valid", False),
        parent_remote=parent.get("remote", False),
        parent_sampled=parent.get("sampled", False),
        counted=parent.get("counted", False),
    )


def test_global_settings_update_and_clear_back_to_the_start_values() -> None:
    store = TraceSettingsStore(TraceSettings(rate=10))
    assert store.get()["trace_rate"] == ["10"]
    got = store.update("", {"trace_rate": ["3"], "trace_level": ["OFF"], "trace_count": ["5"]})
    assert (got["trace_rate"], got["trace_level"], got["trace_count"]) == (["3"], ["OFF"], ["5"])
    got = store.update("", {"trace_rate": [], "trace_level": [], "trace_count": []})
    assert (got["trace_rate"], got["trace_level"], got["trace_count"]) == (
        ["10"],
        ["TIMESTAMPS"],
        ["-1"],
    )
    assert got["log_frequency"] == ["0"] and got["trace_mode"] == ["opentelemetry"]


def test_model_settings_override_then_fall_back_to_the_global_ones() -> None:
    store = TraceSettingsStore(TraceSettings())
    store.update("m", {"trace_level": ["OFF"]})
    assert store.get("m")["trace_level"] == ["OFF"]
    assert store.get("other")["trace_level"] == ["TIMESTAMPS"]
    assert not decide(store, "m") and decide(store, "other") and decide(store)
    store.update("", {"trace_rate": ["5"]})
    assert store.get("m")["trace_rate"] == ["5"]  # not overridden: the global value shows
    store.update("m", {"trace_level": []})
    assert store.get("m")["trace_level"] == ["TIMESTAMPS"]


def test_rate_samples_every_nth_new_trace_per_scope() -> None:
    store = TraceSettingsStore(TraceSettings(rate=3))
    assert [decide(store) for _ in range(6)] == [False, False, True, False, False, True]
    store.update("m", {"trace_rate": ["2"]})
    assert [decide(store, "m") for _ in range(4)] == [False, True, False, True]
    store.update("", {"trace_rate": ["0"]})
    assert not any(decide(store) for _ in range(5))


def test_count_counts_down_then_stops_and_can_be_reset() -> None:
    store = TraceSettingsStore(TraceSettings())
    store.update("", {"trace_count": ["2"]})
    assert [decide(store) for _ in range(3)] == [True, True, False]
    assert store.get()["trace_count"] == ["0"]
    # spans under a sampled span of this process are not new traces: they continue
    assert decide(store, valid=True, remote=False, sampled=True)
    store.update("m", {"trace_count": ["1"]})
    assert [decide(store, "m") for _ in range(2)] == [True, False]
    store.update("", {"trace_count": []})
    assert store.get()["trace_count"] == ["-1"] and decide(store)


def test_count_takes_a_trace_once_in_the_mesh() -> None:
    """A sampled parent another meshserve service counted (an ensemble step, a BLS call) is
    followed without counting it again, even with no count left here; an uncounted sampled
    parent (the gateway's span, a client's) is counted."""
    store = TraceSettingsStore(TraceSettings())
    store.update("", {"trace_count": ["1"]})
    for _ in range(3):
        assert decide(store, valid=True, remote=True, sampled=True, counted=True)
    assert store.get()["trace_count"] == ["1"]
    assert decide(store, valid=True, remote=True, sampled=True)  # enters the mesh here: counted
    assert not decide(store, valid=True, remote=True, sampled=True)
    assert decide(store, valid=True, remote=True, sampled=True, counted=True)
    assert not decide(store, valid=True, remote=True, sampled=False, counted=True)


def test_parent_decisions() -> None:
    follow = TraceSettingsStore(TraceSettings(rate=0), follow_parent=True)
    assert decide(follow, valid=True, remote=True, sampled=True)
    assert not decide(follow, valid=True, remote=True, sampled=False)
    assert not decide(follow)  # rate 0: no trace of its own
    own = TraceSettingsStore(TraceSettings(rate=1), follow_parent=False)
    assert decide(own, valid=True, remote=True, sampled=False)  # always_on ignores the parent
    assert not decide(own, valid=True, remote=False, sampled=False)  # local parents always rule
    off = TraceSettingsStore(TraceSettings(level="OFF"))
    assert not decide(off, valid=True, remote=True, sampled=True)
    follow.disable()
    assert not decide(follow, valid=True, remote=True, sampled=True)


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"trace_file": ["/tmp/t.json"]}, "'trace_file' cannot be changed"),
        ({"log_frequency": ["10"]}, "'log_frequency' cannot be changed"),
        ({"trace_mode": ["triton"]}, "'trace_mode' cannot be changed"),
        ({"trace_level": ["TENSORS"]}, r"\['TENSORS'\] is not supported"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, "OFF and TIMESTAMPS at once"),
        ({"trace_rate": ["-1"]}, "'trace_rate' must be >= 0"),
        ({"trace_rate": ["1", "2"]}, "takes one value"),
        ({"trace_count": ["x"]}, "'trace_count' must be an integer"),
        ({"samples": ["1"]}, "unknown trace setting 'samples'"),
    ],
)
def test_bad_updates_are_refused_and_change_nothing(
    updates: dict[str, list[str]], message: str
) -> None:
    store = TraceSettingsStore(TraceSettings())
    before = store.get()
    with pytest.raises(InvalidArgument, match=message):
        store.update("", {"trace_rate": ["7"], **updates})
    assert store.get() == before


def test_clearing_unsettable_settings_is_accepted() -> None:
    store = TraceSettingsStore(TraceSettings())
    assert store.update("", {"trace_file": [], "log_frequency": []}) == store.get()


def test_http_json_forms() -> None:
    assert updates_from_json({"trace_rate": "5", "trace_level": ["OFF"], "trace_count": None}) == {
        "trace_rate": ["5"],
        "trace_level": ["OFF"],
        "trace_count": [],
    }
    assert updates_from_json({"trace_rate": 5}) == {"trace_rate": ["5"]}
    with pytest.raises(InvalidArgument, match="'trace_rate' must be a string"):
        updates_from_json({"trace_rate": True})
    rendered = settings_to_json(TraceSettingsStore(TraceSettings()).get())
    assert rendered["trace_level"] == ["TIMESTAMPS"] and rendered["trace_rate"] == "1"
