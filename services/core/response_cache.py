"""Triton's response cache: a request whose inputs match an earlier successful one is answered
from memory instead of running the model.

Where it sits in the data flow: the service owns one ``ResponseCache`` (``--cache-config
local,size=BYTES``, shared by all its models, bounded in bytes, least recently used entry evicted
first). A model opts in with ``response_cache { enable: true }``; its ``ServedModel`` then holds a
``ModelCache`` and asks it before validating and queueing a request (``lookup``) and after a
successful answer (``store``). The key is a SHA-256 hash (its first 128 bits) of a number unique
to the model version's load (two models never share an entry, and a reloaded version never
answers from its previous weights), each input's name, datatype, shape and bytes, and the
request's own parameters (a Python model may read them). The value is every output of the
model, copied and read-only; what the client asked for (a subset, classification, shared memory)
is applied to it afterwards as for any answer. A model's entries go when it is unloaded.

Statistics follow Triton's: a hit counts as a success and in ``queue`` (0 ns), not in
``compute_*``, ``inference_count`` or ``execution_count``; ``cache_hit`` times the lookup,
``cache_miss`` the lookup and the insertion of a request that ran and succeeded. Identical
requests that arrive while a miss runs wait for its answer and count as hits (their lookup time
includes the wait), so a burst of the same request runs the model once. Everything runs on the
event loop thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric

from services.core import tracing
from services.core.requests import Array, InferRequest
from services.core.statistics import ModelStats

log = logging.getLogger(__name__)

#: bytes counted per entry besides its outputs (key, dict, array headers)
ENTRY_OVERHEAD = 256
#: inputs of at least this many bytes are hashed off the event loop (~0.7 ms of SHA-256 here)
THREAD_HASH_BYTES = 1 << 20
#: the one cache implementation (Triton's ``local``); ``redis`` and custom ones are not built in
LOCAL = "local"


def parse_cache_config(values: Sequence[str]) -> int:
    """The cache size in bytes from tritonserver-style ``--cache-config`` values
    (``local,size=1048576``; the flag may repeat, one key each); 0 when none is given."""
    size = 0
    for value in values:
        name, _, rest = value.partition(",")
        name = name.strip()
        if name != LOCAL:
            raise ValueError(
                f"--cache-config {value!r}: only the '{LOCAL}' cache is built in "
                f"(give --cache-config {LOCAL},size=BYTES)"
            )
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, text = item.partition("=")
            if not sep or key.strip() != "size":
                raise ValueError(
                    f"--cache-config {value!r}: the {LOCAL} cache takes one setting, size=BYTES"
                )
            try:
                size = int(text.strip())
            except ValueError:
                size = -1
            if size < 0:
                raise ValueError(
                    f"--cache-config {value!r}: size must be a whole number of bytes (0 = off)"
                )
    return size


@dataclass(slots=True)
class _Entry:
    owner: int
    outputs: dict[str, Array]
    size: int


class ResponseCache:
    """Responses of every cached model of this process, at most ``capacity`` bytes in all."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"a response cache needs a positive size in bytes, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._owners = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def new_owner(self) -> int:
        """A number for one model load; its entries are keyed and dropped by it."""
        return next(self._owners)

    def get(self, key: bytes) -> dict[str, Array] | None:
        """The outputs stored under ``key`` (read-only arrays, a fresh dict), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return dict(entry.outputs)

    def put(self, key: bytes, owner: int, outputs: Mapping[str, Array]) -> bool:
        """Store a copy of ``outputs``, evicting the least recently used entries to make room;
        False when the outputs alone are larger than the whole cache."""
        size = ENTRY_OVERHEAD + sum(_nbytes(a) for a in outputs.values())
        if size > self.capacity:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.used -= old.size
        while self.used + size > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            self.used -= evicted.size
            self.evictions += 1
        self._entries[key] = _Entry(owner, {n: _frozen(a) for n, a in outputs.items()}, size)
        self.used += size
        return True

    def drop(self, owner: int) -> int:
        """Remove every entry of ``owner`` (an unloaded model); returns how many."""
        keys = [k for k, e in self._entries.items() if e.owner == owner]
        for key in keys:
            self.used -= self._entries.pop(key).size
        return len(keys)


def request_key(owner: int, request: InferRequest) -> bytes:
    """The hash identifying ``request``'s inputs and parameters for one model load."""
    h = hashlib.sha256(owner.to_bytes(8, "little"))
    for name in sorted(request.inputs):
        arr = request.inputs[name]
        h.update(f"\0{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        if arr.dtype.kind == "O":
            for item in arr.flat:
                data = item if isinstance(item, bytes) else str(item).encode()
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        else:
            h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    if request.parameters:
        h.update(repr(sorted(request.parameters.items())).encode())
    return h.digest()[:16]


def _nbytes(arr: Array) -> int:
    if arr.dtype.kind == "O":
        return 8 * arr.size + sum(len(x) if isinstance(x, bytes | str) else 64 for x in arr.flat)
    return int(arr.nbytes)


def _frozen(arr: Array) -> Array:
    """A read-only copy that owns its memory (not a view keeping a whole batch alive)."""
    copy = np.array(arr, copy=True, order="C")
    copy.setflags(write=False)
    return copy


@dataclass(slots=True)
class Lookup:
    """One request's lookup: its key, the stored outputs on a hit, and the lookup's duration."""

    key: bytes
    outputs: dict[str, Array] | None
    ns: int
    #: a miss that identical requests arriving while it runs wait for (store / abandon end it)
    first: bool = False


class ModelCache:
    """One loaded model version's use of the service's cache, recorded in its statistics."""

    def __init__(self, cache: ResponseCache, stats: ModelStats) -> None:
        self._cache = cache
        self._stats = stats
        self._owner = cache.new_owner()
        self._closed = False
        #: misses running now, by key: the outputs once the request succeeds (None: it failed)
        self._running: dict[bytes, asyncio.Future[dict[str, Array] | None]] = {}

    async def lookup(self, request: InferRequest) -> Lookup:
        """Hash the request and look it up; a hit is recorded as a successful request. Large
        inputs are hashed on a worker thread (hashlib lets go of the GIL), not on the loop.

        A request identical to one that missed and is still running waits for that one's answer
        and is a hit (its lookup time includes the wait) instead of running the model again; if
        that one fails, it runs itself. The first miss must end with ``store`` or ``abandon``."""
        start = time.monotonic_ns()
        if sum(a.nbytes for a in request.inputs.values()) < THREAD_HASH_BYTES:
            key = request_key(self._owner, request)
        else:
            key = await asyncio.to_thread(request_key, self._owner, request)
        outputs = self._cache.get(key)
        first = False
        if outputs is None:
            running = self._running.get(key)
            if running is not None:
                answer = await asyncio.shield(running)  # its caller giving up does not end it
                outputs = None if answer is None else dict(answer)
            else:
                self._running[key] = asyncio.get_running_loop().create_future()
                first = True
        end = time.monotonic_ns()
        if outputs is not None:
            since = request.arrival_ns or start
            self._stats.record_cache_hit(request_ns=end - since, lookup_ns=end - start)
            if tracing.recording():
                tracing.annotate({tracing.CACHE_HIT: True})
        return Lookup(key, outputs, end - start, first)

    def store(self, lookup: Lookup, outputs: Mapping[str, Array]) -> None:
        """Keep a successful request's outputs; the miss is recorded with lookup + insertion.
        Identical requests waiting for it get the same (read-only) outputs."""
        start = time.monotonic_ns()
        # a request that finished while the version was being unloaded is not kept
        kept = not self._closed and self._cache.put(lookup.key, self._owner, outputs)
        self._stats.record_cache_miss(lookup.ns + time.monotonic_ns() - start)
        if lookup.first:
            stored = self._cache.get(lookup.key) if kept else None
            self._end(lookup, stored or {n: _frozen(a) for n, a in outputs.items()})

    def abandon(self, lookup: Lookup) -> None:
        """A miss that failed or was cancelled: identical requests waiting for it run
        themselves."""
        if lookup.first:
            self._end(lookup, None)

    def _end(self, lookup: Lookup, outputs: dict[str, Array] | None) -> None:
        running = self._running.pop(lookup.key, None)
        if running is not None and not running.done():
            running.set_result(outputs)

    def close(self) -> None:
        """Forget this load's entries (the model version is unloaded)."""
        self._closed = True
        self._cache.drop(self._owner)


class CacheMetricsCollector:
    """The cache's own gauges for the metrics endpoint (Triton's names for them)."""

    def __init__(self, cache: ResponseCache) -> None:
        self._cache = cache

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        cache = self._cache
        yield GaugeMetricFamily(
            "nv_cache_num_entries", "Number of responses stored in the response cache", len(cache)
        )
        yield GaugeMetricFamily(
            "nv_cache_num_evictions",
            "Number of responses evicted from the response cache to make room",
            cache.evictions,
        )
        yield GaugeMetricFamily(
            "nv_cache_util", "Response cache utilization [0.0 - 1.0]", cache.used / cache.capacity
        )
