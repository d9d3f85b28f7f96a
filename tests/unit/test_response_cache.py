"""The response cache's parts: --cache-config parsing, the LRU store bounded in bytes, the request
key, and what a hit and a miss add to a model's statistics."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.core.requests import InferRequest
from services.core.response_cache import (
    ENTRY_OVERHEAD,
    THREAD_HASH_BYTES,
    ModelCache,
    ResponseCache,
    parse_cache_config,
    request_key,
)
from services.core.settings import settings_from_args
from services.core.statistics import ModelStats


def _request(**inputs: np.ndarray) -> InferRequest:
    return InferRequest("m", "", dict(inputs))


# ---- --cache-config ---------------------------------------------------------------------------
def test_cache_config_takes_tritons_local_form() -> None:
    assert parse_cache_config([]) == 0
    assert parse_cache_config(["local,size=1048576"]) == 1048576
    assert parse_cache_config(["local", "local,size=4096"]) == 4096
    assert parse_cache_config(["local,size=0"]) == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("redis,host=localhost", "only the 'local' cache"),
        ("local,bytes=10", "one setting, size=BYTES"),
        ("local,size", "one setting, size=BYTES"),
        ("local,size=-1", "whole number of bytes"),
        ("local,size=1MB", "whole number of bytes"),
    ],
)
def test_cache_config_errors_say_what_to_write(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cache_config([value])


def test_service_flags_set_the_cache_size(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model-repository", "/tmp"]
    assert settings_from_args(base, "svc").response_cache_bytes == 0
    assert (
        settings_from_args([*base, "--cache-config", "local,size=2048"], "svc")
    ).response_cache_bytes == 2048
    assert (
        settings_from_args([*base, "--response-cache-byte-size", "512"], "svc")
    ).response_cache_bytes == 512
    with pytest.raises(SystemExit):
        settings_from_args(
            [*base, "--cache-config", "local,size=1", "--response-cache-byte-size", "2"], "svc"
        )
    assert "give the cache size once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings_from_args([*base, "--cache-config", "redis,host=x"], "svc")
    assert "only the 'local' cache" in capsys.readouterr().err


# ---- the store --------------------------------------------------------------------------------
def _outputs(nbytes: int, fill: int = 0) -> dict[str, np.ndarray]:
    return {"OUT": np.full(nbytes, fill, dtype=np.uint8)}


def test_a_stored_response_is_a_read_only_copy() -> None:
    cache = ResponseCache(10_000)
    source = np.arange(8, dtype=np.int32)
    assert cache.put(b"k", 1, {"OUT": source[::2]})
    source[:] = -1  # the model's buffer is reused: the entry must not change
    got = cache.get(b"k")
    assert got is not None
    assert got["OUT"].tolist() == [0, 2, 4, 6]
    assert not got["OUT"].flags.writeable
    got.pop("OUT")  # a caller changing its dict does not change the entry
    again = cache.get(b"k")
    assert again is not None and again["OUT"].tolist() == [0, 2, 4, 6]
    assert cache.get(b"other") is None


def test_least_recently_used_entries_are_evicted_to_fit() -> None:
    entry = ENTRY_OVERHEAD + 100
    cache = ResponseCache(3 * entry)
    for key in (b"a", b"b", b"c"):
        assert cache.put(key, 1, _outputs(100))
    assert (len(cache), cache.used, cache.evictions) == (3, 3 * entry, 0)
    assert cache.get(b"a") is not None  # a is now the most recently used
    assert cache.put(b"d", 1, _outputs(100))
    assert cache.get(b"b") is None  # b was the least recently used
    assert all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    assert (len(cache), cache.used, cache.evictions) == (3, 3 * entry, 1)
    assert cache.put(b"e", 1, _outputs(2 * 100 + ENTRY_OVERHEAD))  # needs two entries' room
    assert (len(cache), cache.evictions) == (2, 3)


def test_a_response_larger_than_the_cache_is_not_stored() -> None:
    cache = ResponseCache(ENTRY_OVERHEAD + 10)
    assert cache.put(b"small", 1, _outputs(10))
    assert not cache.put(b"big", 1, _outputs(11))
    assert cache.get(b"small") is not None and cache.get(b"big") is None


def test_storing_a_key_again_replaces_it() -> None:
    cache = ResponseCache(10_000)
    cache.put(b"k", 1, _outputs(100, fill=1))
    cache.put(b"k", 1, _outputs(50, fill=2))
    got = cache.get(b"k")
    assert got is not None and got["OUT"].tolist() == [2] * 50
    assert (len(cache), cache.used) == (1, ENTRY_OVERHEAD + 50)


def test_dropping_an_owner_removes_only_its_entries() -> None:
    cache = ResponseCache(10_000)
    cache.put(b"a", 1, _outputs(10))
    cache.put(b"b", 2, _outputs(10))
    cache.put(b"c", 1, _outputs(10))
    assert cache.drop(1) == 2
    assert (len(cache), cache.used) == (1, ENTRY_OVERHEAD + 10)
    assert cache.get(b"b") is not None


def test_bytes_outputs_count_their_strings() -> None:
    cache = ResponseCache(ENTRY_OVERHEAD + 16 + 1000)
    strings = np.array([b"x" * 500, b"y" * 500], dtype=np.object_)
    assert cache.put(b"k", 1, {"OUT": strings})
    assert cache.used == ENTRY_OVERHEAD + 16 + 1000
    got = cache.get(b"k")
    assert got is not None and got["OUT"].tolist() == strings.tolist()


def test_a_cache_needs_a_positive_size() -> None:
    with pytest.raises(ValueError, match="positive size"):
        ResponseCache(0)


# ---- the key ----------------------------------------------------------------------------------
def test_equal_requests_share_a_key_and_any_difference_changes_it() -> None:
    base = np.arange(6, dtype=np.int32).reshape(2, 3)
    key = request_key(1, _request(A=base, B=base))
    assert request_key(1, _request(B=base.copy(), A=base.copy())) == key  # order, identity
    assert request_key(1, _request(A=np.asfortranarray(base), B=base)) == key  # memory layout
    different = [
        request_key(2, _request(A=base, B=base)),  # another model load
        request_key(1, _request(A=base, C=base)),  # an input's name
        request_key(1, _request(A=base.astype(np.uint32), B=base)),  # datatype, same bytes
        request_key(1, _request(A=base.reshape(3, 2), B=base)),  # shape, same bytes
        request_key(1, _request(A=base + (base == 5), B=base)),  # one element
        request_key(1, _request(A=base)),  # an input fewer
    ]
    with_parameter = _request(A=base, B=base)
    with_parameter.parameters["temperature"] = 0.5
    different.append(request_key(1, with_parameter))
    assert key not in different and len(set(different)) == len(different)


def test_bytes_keys_keep_element_boundaries() -> None:
    one = np.array([b"ab", b"c"], dtype=np.object_)
    other = np.array([b"a", b"bc"], dtype=np.object_)
    assert request_key(1, _request(S=one)) != request_key(1, _request(S=other))
    assert request_key(1, _request(S=one)) == request_key(1, _request(S=one.copy()))


def test_keys_cover_bf16_and_scalar_tensors() -> None:
    bf16 = np.zeros((2, 3), dtype="V2")
    changed = bf16.copy()
    changed.view(np.uint16)[1, 2] = 7
    assert request_key(1, _request(X=bf16)) != request_key(1, _request(X=changed))
    assert request_key(1, _request(X=np.array(3, np.int32))) != request_key(
        1, _request(X=np.array(4, np.int32))
    )


# ---- statistics -------------------------------------------------------------------------------
def test_a_hit_is_a_success_without_compute_and_a_miss_is_timed() -> None:
    stats = ModelStats()
    model = ModelCache(ResponseCache(10_000), stats)
    request = _request(A=np.ones(4, np.float32))
    miss = asyncio.run(model.lookup(request))
    assert miss.outputs is None and stats.cache_hit_count == 0
    stats.record_execution(
        batch_size=1, inference_count=1, compute_input_ns=1, compute_infer_ns=5, compute_output_ns=1
    )
    stats.record_request_success(
        request_ns=10, queue_ns=2, compute_input_ns=1, compute_infer_ns=5, compute_output_ns=1
    )
    model.store(miss, {"OUT": np.zeros(2, np.float32)})
    hit = asyncio.run(model.lookup(_request(A=np.ones(4, np.float32))))
    assert hit.outputs is not None and hit.outputs["OUT"].tolist() == [0.0, 0.0]

    proto = stats.to_proto("m", "1")
    infer = proto.inference_stats
    assert (infer.success.count, infer.queue.count, infer.compute_infer.count) == (2, 2, 1)
    assert (infer.cache_hit.count, infer.cache_miss.count) == (1, 1)
    assert infer.cache_hit.ns > 0 and infer.cache_miss.ns >= miss.ns > 0
    assert (proto.inference_count, proto.execution_count) == (1, 1)
    assert infer.queue.ns == 2 and infer.compute_infer.ns == 5


def test_a_closed_model_stores_nothing_more() -> None:
    cache = ResponseCache(10_000)
    stats = ModelStats()
    model = ModelCache(cache, stats)
    lookup = asyncio.run(model.lookup(_request(A=np.ones(1, np.int8))))
    model.store(lookup, {"OUT": np.ones(1, np.int8)})
    assert len(cache) == 1
    late = asyncio.run(model.lookup(_request(A=np.zeros(1, np.int8))))
    model.close()
    assert len(cache) == 0
    model.store(late, {"OUT": np.ones(1, np.int8)})  # finished while the version unloaded
    assert len(cache) == 0


def test_large_inputs_are_hashed_off_the_loop_to_the_same_key() -> None:
    cache = ResponseCache(10_000)
    model = ModelCache(cache, ModelStats())
    big = np.arange(THREAD_HASH_BYTES // 4 + 1, dtype=np.float32)

    async def run() -> tuple[bool, bool]:
        first = await model.lookup(_request(A=big))
        model.store(first, {"OUT": np.ones(1, np.int8)})
        again = await model.lookup(_request(A=big.copy()))
        return first.key == request_key(1, _request(A=big)), again.outputs is not None

    assert asyncio.run(run()) == (True, True)


def test_identical_requests_during_a_miss_wait_for_its_answer() -> None:
    stats = ModelStats()
    model = ModelCache(ResponseCache(10_000), stats)

    async def run() -> None:
        first = await model.lookup(_request(A=np.ones(3, np.int32)))
        assert first.outputs is None and first.first
        waiting = [
            asyncio.create_task(model.lookup(_request(A=np.ones(3, np.int32)))) for _ in range(3)
        ]
        other = await model.lookup(_request(A=np.zeros(3, np.int32)))  # different inputs
        assert other.first and other.outputs is None
        await asyncio.sleep(0)
        assert not any(t.done() for t in waiting)
        waiting[0].cancel()  # one caller gives up: the others still get the answer
        model.store(first, {"OUT": np.full(2, 7, np.int32)})
        answers = await asyncio.gather(*waiting[1:])
        for answer in answers:
            assert answer.outputs is not None and not answer.first
            assert answer.outputs["OUT"].tolist() == [7, 7]
            assert not answer.outputs["OUT"].flags.writeable
        model.abandon(other)

    asyncio.run(run())
    proto = stats.to_proto("m", "1").inference_stats
    assert (proto.cache_hit.count, proto.cache_miss.count) == (2, 1)


def test_when_the_first_miss_fails_the_waiting_requests_run_themselves() -> None:
    model = ModelCache(ResponseCache(10_000), ModelStats())

    async def run() -> None:
        first = await model.lookup(_request(A=np.ones(2, np.int8)))
        waiting = asyncio.create_task(model.lookup(_request(A=np.ones(2, np.int8))))
        await asyncio.sleep(0)
        model.abandon(first)
        retry = await waiting
        assert retry.outputs is None and not retry.first  # a miss: it runs the model itself
        model.store(retry, {"OUT": np.ones(1, np.int8)})  # and its answer is kept
        again = await model.lookup(_request(A=np.ones(2, np.int8)))
        assert again.outputs is not None

    asyncio.run(run())


def test_an_answer_too_large_to_keep_still_reaches_the_waiting_requests() -> None:
    cache = ResponseCache(ENTRY_OVERHEAD + 8)
    model = ModelCache(cache, ModelStats())

    async def run() -> None:
        first = await model.lookup(_request(A=np.ones(2, np.int8)))
        waiting = asyncio.create_task(model.lookup(_request(A=np.ones(2, np.int8))))
        await asyncio.sleep(0)
        model.store(first, {"OUT": np.ones(64, np.int8)})
        answer = await waiting
        assert answer.outputs is not None and answer.outputs["OUT"].size == 64
        assert len(cache) == 0

    asyncio.run(run())
