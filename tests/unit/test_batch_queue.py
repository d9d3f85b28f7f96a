"""Dynamic batcher, part 1: the pure BatchQueue rules (batch_queue.py) and config parsing.

Every rule takes ``now_ns`` explicitly, so these tests are deterministic with no clock at all.
The asyncio driver is tested in test_batcher.py.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Hashable, Sequence
from typing import Any

import pytest

from protos.gen.inference import model_config_pb2 as mc
from services.core.batch_queue import BatchPolicy, BatchQueue, Pending, QueuePolicy
from services.core.batcher import batch_policy_from_config
from services.core.errors import InvalidArgument, ModelLoadError, QueueFull

US = 1000  # nanoseconds per microsecond

BASE = BatchPolicy(model="m", max_batch_size=8, dynamic=True)


def policy(**changes: Any) -> BatchPolicy:
    return dataclasses.replace(BASE, **changes)


def item(
    q: BatchQueue[Pending[str]],
    name: str,
    now: int,
    *,
    size: int = 1,
    sig: Hashable = "s",
    priority: int = 0,
    timeout_us: int = 0,
) -> Pending[str]:
    level = q.level_of(priority)
    it = Pending(name, size, sig, level, now, q.deadline_of(level, now, timeout_us))
    q.push(it)
    return it


def names(items: Sequence[Pending[str]] | None) -> list[str]:
    assert items is not None
    return [it.payload for it in items]


def test_preferred_size_sent_at_once_largest_reachable_wins() -> None:
    q: BatchQueue[Pending[str]] = BatchQueue(
        policy(preferred_batch_sizes=(2, 4), max_queue_delay_us=1000)
    )
    for n in "abcde":
        item(q, n, 0)
    assert names(q.next_batch(0)[0]) == ["a", "b", "c", "d"]
    assert q.next_batch(0) == (None, 1000 * US)  # "e" alone waits for the delay
    item(q, "f", 10)
    assert names(q.next_batch(10)[0]) == ["e", "f"]


def test_max_batch_size_never_exceeded() -> None:
    rng = random.Random(7)
    q: BatchQueue[Pending[str]] = BatchQueue(policy(max_batch_size=8, preferred_batch_sizes=(4, 6)))
    sizes = {f"r{i}": rng.randint(1, 8) for i in range(300)}
    for n, s in sizes.items():
        item(q, n, 0, size=s, sig=rng.choice("ab"))
    seen: list[str] = []
    while len(q):
        batch, _ = q.next_batch(0)
        assert batch is not None
        assert sum(it.batch_size for it in batch) <= 8
        assert len({it.signature for it in batch}) == 1
        seen += names(batch)
    assert seen == list(sizes)  # each exactly once, in order


def test_batch_waits_for_max_queue_delay_unless_full() -> None:
    q: BatchQueue[Pending[str]] = BatchQueue(policy(max_batch_size=4, max_queue_delay_us=100))
    item(q, "a", 0)
    item(q, "b", 50 * US)
    assert q.next_batch(99 * US) == (None, 100 * US)
    assert names(q.next_batch(100 * US)[0]) == ["a", "b"]
    for n in "cdef":
        item(q, n, 200 * US, size=1)
    assert names(q.next_batch(200 * US)[0]) == ["c", "d", "e", "f"]  # full: no waiting


def test_zero_delay_is_greedy() -> None:
    q: BatchQueue[Pending[str]] = BatchQueue(policy(max_batch_size=4))
    item(q, "a", 0)
    item(q, "b", 0)
    assert names(q.next_batch(0)[0]) == ["a", "b"]
    assert q.next_batch(0) == (None, None)


def test_signatures_never_mixed() -> None:
    q: BatchQueue[Pending[str]] = BatchQueue(policy(max_queue_delay_us=100))
    item(q, "a1", 0, sig=(3, 4))
    item(q, "a2", 0, sig=(3, 4))
    item(q, "b1", 0, sig=(5,))
    item(q, "a3", 0, sig=(3, 4))
    assert names(q.next_batch(0)[0]) == ["a1", "a2"]  # cannot grow past b1: sent now
    assert names(q.next_batch(0)[0]) == ["b1"]
    assert q.next_batch(0)[0] is None  # a3 alone waits for the delay
    assert names(q.next_batch(100 * US)[0]) == ["a3"]


def test_higher_priority_level_served_first() -> None:
    q: BatchQueue[Pending[str]] = BatchQueue(
        policy(max_batch_size=1, priority_levels=3, default_priority_level=2)
    )
    item(q, "default", 0)  # priority 0 -> level 2
    item(q, "low", 0, priority=3)
    item(q, "high", 0, priority=1)
    item(q, "out-of-range", 0, priority=9)  # -> default level
    order = [names(q.next_batch(0)[0])[0] for _ in range(4)]
    assert order == ["high", "default", "out-of-range", "low"]


def test_queue_full_names_model_and_limit() -> None:
    per_level = {1: QueuePolicy(max_queue_size=2)}
    q: BatchQueue[Pending[str]] = BatchQueue(
        policy(priority_levels=2, default_priority_level=2, priority_queue_policy=per_level)
    )
    item(q, "a", 0, priority=1)
    item(q, "b", 0, priority=1)
    with pytest.raises(QueueFull, match=r"'m'.*max_queue_size 2"):
        item(q, "c", 0, priority=1)
    item(q, "d", 0, priority=2)  # level 2 is unbounded
    assert len(q) == 3


def test_timeout_reject_removes_request() -> None:
    q: BatchQueue[Pending[str]] = BatchQueue(
        policy(max_queue_delay_us=1000, default_queue_policy=QueuePolicy(default_timeout_us=100))
    )
    a = item(q, "a", 0)
    item(q, "b", 50 * US)
    assert q.next_batch(0) == (None, 100 * US)  # the deadline comes before the delay
    assert q.expire(99 * US) == []
    assert q.expire(100 * US) == [a]
    assert len(q) == 1
    assert q.next_deadline() == 150 * US


def test_timeout_delay_serves_expired_after_others() -> None:
    p = policy(
        max_batch_size=1,
        default_queue_policy=QueuePolicy(default_timeout_us=100, delay_on_timeout=True),
    )
    q: BatchQueue[Pending[str]] = BatchQueue(p)
    item(q, "old", 0)
    item(q, "new", 90 * US)
    assert q.expire(100 * US) == []  # "old" is delayed, not dropped
    assert len(q) == 2
    item(q, "newer", 120 * US)
    order = [names(q.next_batch(120 * US)[0])[0] for _ in range(3)]
    assert order == ["new", "newer", "old"]


@pytest.mark.parametrize(
    ("allow", "default_us", "asked_us", "expected_us"),
    [
        (True, 100, 40, 40),  # shorter: honoured
        (True, 100, 400, 100),  # longer: never extends the default
        (True, 0, 40, 40),  # no default: the request's own applies
        (False, 100, 40, 100),  # not allowed: the default
        (False, 0, 40, None),  # not allowed and no default: none
    ],
)
def test_timeout_override(
    allow: bool, default_us: int, asked_us: int, expected_us: int | None
) -> None:
    qp = QueuePolicy(default_timeout_us=default_us, allow_timeout_override=allow)
    q: BatchQueue[Pending[str]] = BatchQueue(policy(default_queue_policy=qp))
    expected = None if expected_us is None else 5 + expected_us * US
    assert q.deadline_of(1, 5, asked_us) == expected


def test_direct_mode_one_request_per_batch_fifo() -> None:
    q: BatchQueue[Pending[str]] = BatchQueue(policy(dynamic=False, priority_levels=0))
    for n in "abc":
        item(q, n, 0, priority=1)
    assert [names(q.next_batch(0)[0]) for _ in range(3)] == [["a"], ["b"], ["c"]]


def test_invalid_policies_rejected() -> None:
    with pytest.raises(ValueError, match="preferred_batch_size 16"):
        policy(preferred_batch_sizes=(16,))
    with pytest.raises(ValueError, match="default_priority_level"):
        policy(priority_levels=2, default_priority_level=0)


def test_policy_from_config() -> None:
    config = mc.ModelConfig(name="m", max_batch_size=16)
    assert batch_policy_from_config(config) == BatchPolicy(
        model="m", max_batch_size=16, dynamic=False
    )
    db = config.dynamic_batching
    db.preferred_batch_size.extend([8, 4])
    db.max_queue_delay_microseconds = 250
    db.preserve_ordering = True
    db.priority_levels = 2
    db.default_priority_level = 2
    db.default_queue_policy.max_queue_size = 10
    db.priority_queue_policy[1].timeout_action = mc.ModelQueuePolicy.DELAY
    db.priority_queue_policy[1].default_timeout_microseconds = 500
    db.priority_queue_policy[1].allow_timeout_override = True
    got = batch_policy_from_config(config)
    assert got.preferred_batch_sizes == (4, 8)
    assert got.max_queue_delay_us == 250
    assert got.preserve_ordering
    assert got.default_queue_policy == QueuePolicy(max_queue_size=10)
    assert got.priority_queue_policy == {
        1: QueuePolicy(default_timeout_us=500, delay_on_timeout=True, allow_timeout_override=True)
    }
    db.default_priority_level = 3
    with pytest.raises(ModelLoadError, match="default_priority_level 3"):
        batch_policy_from_config(config)


def test_oversized_request_is_a_caller_error() -> None:
    q: BatchQueue[Pending[str]] = BatchQueue(policy(max_batch_size=4))
    with pytest.raises(InvalidArgument, match="batch size 5"):
        item(q, "big", 0, size=5)
    assert len(q) == 0
