"""The values behind ``pb_utils.MetricFamily`` / ``Metric`` (services/python/custom_metrics.py).

Where it sits: the API objects in custom_metrics.py hold a place here (a ``FamilyHold`` or a
``MetricHold``) and release it when they die; ``CustomMetricsRegistry`` keeps the families, their
labelled series and values, checks each operation against the family's kind, and, as a
prometheus_client collector, turns them into ``VerbatimFamily`` families at every scrape (the
process's registry is handed to the kit's ``add_process_collector``). The semantics (duplicates,
naming, lifetime) are written down in custom_metrics.py.
"""

from __future__ import annotations

import bisect
import enum
import gc
import math
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric as PrometheusFamily

from services.core.metrics import VerbatimFamily, add_process_collector, prometheus_number


class MetricKind(enum.Enum):
    """What a family counts; the value is its Prometheus TYPE."""

    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


COUNTER = MetricKind.COUNTER
GAUGE = MetricKind.GAUGE
HISTOGRAM = MetricKind.HISTOGRAM

_LabelKey = tuple[tuple[str, str], ...]


def model_error(message: str) -> Exception:
    """A ``pb_utils.TritonModelException`` carrying ``message`` (what a model sees fail)."""
    # imported here, not on top: triton_python_backend_utils imports custom_metrics, which
    # imports this module
    from services.python.triton_python_backend_utils import TritonModelException

    return TritonModelException(message)


@dataclass(eq=False, slots=True)
class _Series:
    """One label set's values: a counter's or gauge's value, or a histogram's buckets."""

    labels: dict[str, str]
    bounds: tuple[float, ...] = ()
    value: float = 0.0
    #: histogram: observations per bucket (not cumulative), the +Inf bucket last
    counts: list[int] = field(default_factory=list)
    refs: int = 0


@dataclass(eq=False, slots=True)
class _Family:
    name: str
    description: str
    kind: MetricKind
    refs: int = 0
    series: dict[_LabelKey, _Series] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class FamilyHold:
    """One live MetricFamily object's hold on its family, and the Metric holds made through it."""

    family: _Family
    metrics: set[MetricHold] = field(default_factory=set)
    released: bool = False


@dataclass(eq=False, slots=True)
class MetricHold:
    """One live Metric object's hold on its series."""

    owner: FamilyHold
    key: _LabelKey
    series: _Series
    released: bool = False


class CustomMetricsRegistry:
    """Every custom family of a process; a prometheus_client collector.

    Thread safe: one lock guards every read and write. An object dying (in any thread, or in the
    garbage collector in the middle of an operation here) only queues its release; the next
    operation applies it under the lock, before it looks at anything.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        self._dead: deque[FamilyHold | MetricHold] = deque()

    def open_family(self, name: str, description: str, kind: MetricKind) -> FamilyHold:
        """A hold on family ``name`` (created if new); raises if it exists with another kind."""
        hold = self._try_open_family(name, description, kind)
        if isinstance(hold, MetricKind):
            gc.collect()  # an unloaded model's objects in a reference cycle may hold the name
            hold = self._try_open_family(name, description, kind)
        if isinstance(hold, MetricKind):
            raise model_error(
                f"MetricFamily '{name}' already exists as a {hold.name}; a family name has one "
                f"kind, so it cannot also be a {kind.name}: choose another name"
            )
        return hold

    def _try_open_family(
        self, name: str, description: str, kind: MetricKind
    ) -> FamilyHold | MetricKind:
        """A hold on the family, or the kind the name already has when that is another."""
        with self._lock:
            self._drain()
            family = self._families.setdefault(name, _Family(name, description, kind))
            if family.kind is not kind:
                return family.kind
            family.refs += 1
            return FamilyHold(family)

    def open_metric(
        self, owner: FamilyHold, labels: dict[str, str], bounds: tuple[float, ...]
    ) -> MetricHold:
        """A hold on the series of ``labels`` in ``owner``'s family (created if new)."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._drain()
            series = owner.family.series.get(key)
            if series is None:
                counts = [0] * (len(bounds) + 1) if owner.family.kind is HISTOGRAM else []
                series = _Series(dict(key), bounds, counts=counts)
                owner.family.series[key] = series
            series.refs += 1
            hold = MetricHold(owner, key, series)
            owner.metrics.add(hold)
            return hold

    def release(self, hold: FamilyHold | MetricHold) -> None:
        """Queue the release of a dead object's hold (takes no lock: safe in a finalizer)."""
        self._dead.append(hold)

    def update(self, hold: MetricHold, operation: str, amount: float = 0.0) -> float:
        """Apply ``operation`` (increment, set, value, observe) to the held series."""
        with self._lock:
            self._drain()
            family = hold.owner.family
            if hold.released:
                raise model_error(
                    f"Metric of family '{family.name}' can no longer be used: the MetricFamily "
                    "object it was created from was deleted (keep the MetricFamily alive as long "
                    "as its Metric objects)"
                )
            _check_operation(family, operation, amount)
            series = hold.series
            if operation == "increment":
                series.value += amount
            elif operation == "set":
                series.value = amount
            elif operation == "observe":  # into the first bucket whose bound is >= amount
                nan = math.isnan(amount)
                series.counts[
                    len(series.bounds) if nan else bisect.bisect_left(series.bounds, amount)
                ] += 1
                series.value += amount
            return series.value

    def describe(self) -> list[PrometheusFamily]:
        """No fixed names: families come and go with the models' objects."""
        return []

    def collect(self) -> Iterator[PrometheusFamily]:
        """A snapshot of every family that has a series, in creation order."""
        with self._lock:
            self._drain()
            snapshot = [_exposed(f) for f in self._families.values() if f.series]
        return iter(snapshot)

    def _drain(self) -> None:
        while self._dead:
            hold = self._dead.popleft()
            if isinstance(hold, FamilyHold):
                self._release_family(hold)
            else:
                self._release_metric(hold)

    def _release_metric(self, hold: MetricHold) -> None:
        if hold.released:
            return
        hold.released = True
        hold.owner.metrics.discard(hold)
        hold.series.refs -= 1
        series = hold.owner.family.series
        if hold.series.refs == 0 and series.get(hold.key) is hold.series:
            del series[hold.key]

    def _release_family(self, hold: FamilyHold) -> None:
        if hold.released:
            return
        hold.released = True
        for metric in list(hold.metrics):  # Triton clears a family's metrics along with it
            self._release_metric(metric)
        family = hold.family
        family.refs -= 1
        if family.refs == 0 and self._families.get(family.name) is family:
            del self._families[family.name]


_ALLOWED = {
    COUNTER: ("increment", "value"),
    GAUGE: ("increment", "set", "value"),
    HISTOGRAM: ("observe",),
}


def _check_operation(family: _Family, operation: str, amount: float) -> None:
    allowed = _ALLOWED[family.kind]
    if operation not in allowed:
        listed = ", ".join(f"{name}()" for name in allowed)
        raise model_error(
            f"Metric.{operation}() is not supported for {family.kind.name} '{family.name}'; "
            f"a {family.kind.name} supports {listed}"
        )
    if family.kind is COUNTER and operation == "increment" and not amount >= 0:
        raise model_error(
            f"COUNTER '{family.name}' only goes up: increment() needs a value >= 0, got {amount}"
            " (use a GAUGE for a value that also goes down)"
        )


def _exposed(family: _Family) -> VerbatimFamily:
    """The family as the exposition shows it (render_text writes VerbatimFamily as given)."""
    out = VerbatimFamily(family.name, family.description, family.kind.value)
    for series in family.series.values():
        if family.kind is not HISTOGRAM:
            out.add_sample(family.name, dict(series.labels), series.value)
            continue
        out.add_sample(f"{family.name}_count", dict(series.labels), float(sum(series.counts)))
        out.add_sample(f"{family.name}_sum", dict(series.labels), series.value)
        cumulative = 0
        for bound, count in zip((*series.bounds, math.inf), series.counts, strict=True):
            cumulative += count
            labels = {**series.labels, "le": prometheus_number(bound)}
            out.add_sample(f"{family.name}_bucket", labels, float(cumulative))
    return out


_process_registry: CustomMetricsRegistry | None = None
_process_registry_lock = threading.Lock()


def process_registry() -> CustomMetricsRegistry:
    """The registry ``MetricFamily`` uses by default, served on the process's metrics endpoint
    (handed to ``add_process_collector`` when first asked for)."""
    global _process_registry
    with _process_registry_lock:
        if _process_registry is None:
            _process_registry = CustomMetricsRegistry()
            add_process_collector(_process_registry)
        return _process_registry
