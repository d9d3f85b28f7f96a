"""The rate limiter alone (rate_limiter.py): grant order (execution count times priority, ties
to the earlier ask, strictly in order), per-device and global pools, counts defaulting to the
largest need, refusals at registration, withdrawal and unregistering. The schedulers under it:
test_rate_limited_schedulers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ModelLoadError
from services.core.rate_limiter import GLOBAL, ModelLimits, RateLimiter
from services.core.settings import ServerSettings

US = 1000


def config(name: str, *groups: str) -> mc.ModelConfig:
    """A config with these instance_group bodies (text format)."""
    text = f'name: "{name}" ' + " ".join(f"instance_group {{ {g} }}" for g in groups)
    return text_format.Parse(text, mc.ModelConfig())


def limited(resources: str, priority: int = 0, extra: str = "kind: KIND_CPU") -> str:
    """An instance_group body whose rate_limiter lists ``resources`` (text format)."""
    return f"{extra} rate_limiter {{ {resources} priority: {priority} }}"


def r(name: str, count: int, is_global: bool = False) -> str:
    return f'resources {{ name: "{name}" count: {count} global: {str(is_global).lower()} }}'


class Grants:
    """Records the grants of the models it binds: (model, instance) in grant order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []

    def bind(self, limits: ModelLimits) -> ModelLimits:
        limits.bind(lambda i: self.log.append((limits.model, i)))
        return limits


# -- the limiter alone -----------------------------------------------------------------------


def test_off_means_no_limiter_and_on_takes_the_flag_values() -> None:
    base = ServerSettings(model_repository=Path("/nonexistent"))
    assert RateLimiter.from_settings(base) is None
    on = ServerSettings(
        model_repository=Path("/nonexistent"),
        rate_limit="execution_count",
        rate_limit_resources=(("R", 1, -1),),
    )
    limiter = RateLimiter.from_settings(on)
    assert limiter is not None
    with pytest.raises(ModelLoadError, match="makes only 1 available"):
        limiter.register(config("m", limited(r("R", 2))))


def test_waiting_instances_are_granted_by_execution_count_times_priority() -> None:
    limiter, grants = RateLimiter(), Grants()
    holder = grants.bind(limiter.register(config("holder", limited(r("R", 1)))))
    a = grants.bind(limiter.register(config("a", limited(r("R", 1), priority=1))))
    b = grants.bind(limiter.register(config("b", limited(r("R", 1), priority=2))))
    assert holder.try_acquire(0)
    a.request(0)
    b.request(0)
    assert grants.log == []  # R is held
    holder.release(0)
    for _ in range(29):  # each grantee executes, and asks again as it gives R back
        model, _ = grants.log[-1]
        (a if model == "a" else b).release(0, again=True)
    order = "".join(m for m, _ in grants.log)
    # ties go to the earlier ask; priority 2 is granted half as often as priority 1
    assert order[:10] == "ababaabaab"
    assert order.count("a") == 20 and order.count("b") == 10


def test_an_instance_that_executed_more_waits_behind_one_that_executed_less() -> None:
    limiter, grants = RateLimiter(), Grants()
    busy = grants.bind(limiter.register(config("busy", limited(r("R", 1)))))
    fresh = grants.bind(limiter.register(config("fresh", limited(r("R", 1)))))
    for _ in range(3):
        assert busy.try_acquire(0)
        busy.release(0)
    assert fresh.try_acquire(0)
    busy.request(0)  # asks first, but has executed three times
    fresh.release(0, executed=False)  # not counted: fresh still has executed nothing
    assert grants.log == [("busy", 0)]
    fresh.request(0)
    busy.release(0)
    assert grants.log == [("busy", 0), ("fresh", 0)]
    # a grant at once is refused while someone waiting comes first
    assert not busy.try_acquire(0)


def test_the_first_in_order_holds_up_the_rest_even_when_their_resources_are_free() -> None:
    limiter, grants = RateLimiter(), Grants()
    big = grants.bind(limiter.register(config("big", limited(r("R", 2)))))
    small = grants.bind(limiter.register(config("small", limited(r("R", 1), extra="count: 2"))))
    free = grants.bind(limiter.register(config("free", "kind: KIND_CPU")))
    assert small.try_acquire(0)
    big.request(0)  # needs both copies: waits for small's instance 0
    small.request(1)  # one copy is free, but big comes first
    free.request(0)  # needs nothing, yet takes its turn in the order too
    assert grants.log == []
    small.release(0)
    assert grants.log == [("big", 0)]
    big.release(0)
    assert grants.log == [("big", 0), ("small", 1), ("free", 0)]


def test_per_device_pools_are_separate_and_a_global_one_is_shared() -> None:
    limiter, grants = RateLimiter(), Grants()
    gpus = "kind: KIND_GPU gpus: [ 0, 1 ]"
    per_device = grants.bind(limiter.register(config("pd", limited(r("R", 1), extra=gpus))))
    shared = grants.bind(limiter.register(config("gl", limited(r("G", 1, True), extra=gpus))))
    assert limiter.capacity((0, "r")) == limiter.capacity((1, "r")) == 1
    assert limiter.capacity((GLOBAL, "g")) == 1
    assert per_device.try_acquire(0) and per_device.try_acquire(1)  # device 0 and device 1
    assert shared.try_acquire(0)
    assert not shared.try_acquire(1)  # the other GPU, but the same global copy
    shared.request(1)
    shared.release(0)
    assert grants.log == [("gl", 1)]


def test_a_resource_not_given_exists_as_often_as_the_largest_need() -> None:
    limiter = RateLimiter()
    two = limiter.register(config("two", limited(r("R", 2))))
    ones = limiter.register(config("ones", limited(r("R", 1), extra="count: 3")))
    assert limiter.capacity((0, "r")) == 2
    assert ones.try_acquire(0) and ones.try_acquire(1)
    assert not ones.try_acquire(2)
    ones.release(0)
    ones.release(1)
    two.close()  # the largest need left is 1
    assert limiter.capacity((0, "r")) == 1
    assert ones.try_acquire(2) and not ones.try_acquire(0)


def test_a_need_above_the_given_count_is_refused_at_registration() -> None:
    limiter = RateLimiter([("r", 1, -1), ("R", 3, 1), ("g", 2, 0)])
    with pytest.raises(ModelLoadError) as refused:
        limiter.register(config("greedy", limited(r("R", 2))))  # names match whatever the case
    message = refused.value.message
    assert "model 'greedy'" in message and "instance 'greedy_0_0'" in message
    assert "needs 2 of rate_limiter resource 'R' (device 0)" in message
    assert "makes only 1 available" in message
    on_gpu1 = limiter.register(config("gpu1", limited(r("R", 3), extra="kind: KIND_GPU gpus: 1")))
    assert limiter.capacity((1, "r")) == 3  # what is given for device 1 beats every device's 1
    # a global resource gets the largest count given for its name on any device
    limiter.register(config("g", limited(r("G", 2, True))))
    with pytest.raises(ModelLoadError, match="makes only 2 available"):
        limiter.register(config("g3", limited(r("G", 3, True))))
    assert limiter.capacity((GLOBAL, "g")) == 2
    assert on_gpu1.try_acquire(0)  # the refused models left nothing behind


def test_a_resource_must_not_be_global_in_one_model_and_per_device_in_another() -> None:
    limiter = RateLimiter()
    limiter.register(config("a", limited(r("R", 1, True))))
    with pytest.raises(ModelLoadError, match="'r' is per device here but global in model 'a'"):
        limiter.register(config("b", limited(r("r", 1))))


def test_withdrawing_the_first_lets_the_next_through_and_unregistering_frees_all() -> None:
    limiter, grants = RateLimiter(), Grants()
    big = grants.bind(limiter.register(config("big", limited(r("R", 2)))))
    small = grants.bind(limiter.register(config("small", limited(r("R", 1), extra="count: 2"))))
    assert small.try_acquire(0)
    big.request(0)
    small.request(1)
    assert grants.log == []
    assert big.withdraw(0) and not big.withdraw(0)
    assert grants.log == [("small", 1)]
    big.request(0)
    small.close()  # held and granted copies come back; big gets both
    assert grants.log == [("small", 1), ("big", 0)]
    assert limiter.in_use((0, "r")) == 2
    with pytest.raises(RuntimeError, match="closed"):
        small.request(0)
