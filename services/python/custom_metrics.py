"""Triton Python-backend custom metrics: ``pb_utils.MetricFamily`` and ``pb_utils.Metric``.

Where it sits in the data flow: a model's ``initialize`` / ``execute`` / ``finalize`` create
families and metrics and update them from worker threads. These classes check the arguments and
hold a place in the process's ``CustomMetricsRegistry`` (custom_metrics_store.py: the values, thread
safe), which is handed to the kit's ``add_process_collector`` (services/core/metrics.py): the
Python service's ``--metrics-port`` /metrics page shows the families after the Triton ones, read
at every scrape, and the gateway's :8002 page (deploy/mesh_metrics.py) passes them through.

The contract (Triton's Python backend, "Custom Metrics"):

- ``MetricFamily(name, description, kind)``, kind ``MetricFamily.COUNTER``, ``GAUGE`` or
  ``HISTOGRAM`` (pb_utils re-exports ``MetricFamily`` and ``Metric`` only, not the module-level
  ``COUNTER`` / ``GAUGE`` / ``HISTOGRAM`` aliases defined here);
- ``family.Metric(labels={...})``, plus ``buckets=[...]`` for a histogram (required, strictly
  increasing, finite; ``[]`` leaves only the +Inf bucket);
- ``increment(value)``: counters (``value >= 0``) and gauges; ``set(value)``: gauges;
  ``value()``: counters and gauges; ``observe(value)``: histograms. Anything else raises
  ``pb_utils.TritonModelException`` saying what the kind allows.

Choices, following what Triton does where its README is silent:

- Names are Prometheus names (``[a-zA-Z_:][a-zA-Z0-9_:]*``); the ``nv_`` prefix is refused, it is
  the server's own families'. Label names ``[a-zA-Z_][a-zA-Z0-9_]*``, not ``__``-prefixed (nor
  ``le`` on a histogram); label values are strings.
- A second family of an existing name and the same kind is the same family (the first description
  stays); a different kind raises. A second Metric with an existing label set is the same series
  (values shared; a histogram keeps its first buckets).
- Exposition as Triton's: a counter under exactly its name, no ``_total`` added (``# TYPE x
  counter`` / ``x{...} 3``; a name already ending in ``_total`` is kept as given); a histogram as
  ``x_count``, ``x_sum`` and ``x_bucket{...,le="0.1"}``; numbers as ``2023``, ``0.5``, ``+Inf``.
- Lifetime: the model owns its objects, as in Triton. A family is exported while a MetricFamily
  object of its name is alive, a series while a Metric object of its labels is alive, and a family
  with no series is not shown. A Metric whose MetricFamily object is gone is cleared: its
  operations raise. Unloading a model drops its ``TritonPythonModel`` and with it its objects, so
  its families go (at once by reference counting; objects caught in a reference cycle hold them
  until the garbage collector runs; re-creating a name with another kind collects before refusing).
"""

from __future__ import annotations

import itertools
import math
import numbers
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

from services.python.custom_metrics_store import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    CustomMetricsRegistry,
    MetricHold,
    MetricKind,
    model_error,
    process_registry,
)

__all__ = [
    "COUNTER",
    "GAUGE",
    "HISTOGRAM",
    "CustomMetricsRegistry",
    "Metric",
    "MetricFamily",
    "MetricKind",
    "process_registry",
]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RESERVED_PREFIX = "nv_"


def _number(value: object, operation: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise model_error(f"Metric.{operation}() needs a number, got {type(value).__name__}")
    return float(value)


class Metric:
    """One labelled series of a family (``MetricFamily.Metric`` makes them). Thread safe."""

    def __init__(self, registry: CustomMetricsRegistry, hold: MetricHold) -> None:
        self._registry = registry
        self._hold = hold
        weakref.finalize(self, registry.release, hold)

    def increment(self, value: float) -> None:
        """Add ``value`` (COUNTER: >= 0; GAUGE: any sign)."""
        self._registry.update(self._hold, "increment", _number(value, "increment"))

    def set(self, value: float) -> None:
        """Set a GAUGE to ``value``."""
        self._registry.update(self._hold, "set", _number(value, "set"))

    def value(self) -> float:
        """The current value of a COUNTER or GAUGE."""
        return self._registry.update(self._hold, "value")

    def observe(self, value: float) -> None:
        """Record one observation in a HISTOGRAM."""
        self._registry.update(self._hold, "observe", _number(value, "observe"))

    def __repr__(self) -> str:
        family = self._hold.owner.family
        return f"Metric({family.name!r}, labels={self._hold.series.labels!r})"


_MetricObject = Metric  # the class, under a name MetricFamily.Metric does not shadow


class MetricFamily:
    """A named metric of one kind; its labelled series are made by :meth:`Metric`."""

    COUNTER: ClassVar[MetricKind] = MetricKind.COUNTER
    GAUGE: ClassVar[MetricKind] = MetricKind.GAUGE
    HISTOGRAM: ClassVar[MetricKind] = MetricKind.HISTOGRAM

    def __init__(
        self,
        name: str,
        description: str,
        kind: MetricKind,
        *,
        registry: CustomMetricsRegistry | None = None,
    ) -> None:
        """``registry`` (meshserve's, for tests): where the family lives; the process's if None."""
        _check_family(name, description, kind)
        self._registry = process_registry() if registry is None else registry
        self._hold = self._registry.open_family(name, description, kind)
        weakref.finalize(self, self._registry.release, self._hold)

    def Metric(  # noqa: N802 - Triton's method name
        self, labels: Mapping[str, str] | None = None, buckets: Sequence[float] | None = None
    ) -> _MetricObject:
        """The series of ``labels`` ({} when None); HISTOGRAM families need ``buckets``."""
        name, kind = self._hold.family.name, self._hold.family.kind
        clean = _check_labels(name, kind, {} if labels is None else labels)
        bounds = _check_buckets(name, kind, buckets)
        return _MetricObject(self._registry, self._registry.open_metric(self._hold, clean, bounds))

    def __repr__(self) -> str:
        family = self._hold.family
        return f"MetricFamily({family.name!r}, kind={family.kind.name})"


def _check_family(name: object, description: object, kind: object) -> None:
    if not isinstance(name, str) or _METRIC_NAME.fullmatch(name) is None:
        raise model_error(
            f"MetricFamily name {name!r} is not a Prometheus metric name "
            "(letters, digits, '_' and ':', not starting with a digit)"
        )
    if name.startswith(_RESERVED_PREFIX):
        raise model_error(
            f"MetricFamily name '{name}': the '{_RESERVED_PREFIX}' prefix is reserved for the "
            "server's own metrics; choose another name"
        )
    if not isinstance(description, str):
        raise model_error(f"MetricFamily '{name}': description must be a str")
    if not isinstance(kind, MetricKind):
        raise model_error(
            f"MetricFamily '{name}': kind must be pb_utils.MetricFamily.COUNTER, GAUGE or "
            f"HISTOGRAM, got {kind!r}"
        )


def _check_labels(name: str, kind: MetricKind, labels: object) -> dict[str, str]:
    if not isinstance(labels, Mapping):
        raise model_error(f"Metric of '{name}': labels must be a dict of str to str")
    clean: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or _LABEL_NAME.fullmatch(key) is None or key.startswith("__"):
            raise model_error(
                f"Metric of '{name}': label name {key!r} is not a Prometheus label name "
                "(letters, digits and '_', not starting with a digit or '__')"
            )
        if key == "le" and kind is HISTOGRAM:
            raise model_error(f"Metric of '{name}': 'le' is the bucket label of a histogram")
        if not isinstance(value, str):
            raise model_error(
                f"Metric of '{name}': label '{key}' must be a str, got {type(value).__name__}"
            )
        clean[key] = value
    return clean


def _check_buckets(
    name: str, kind: MetricKind, buckets: Sequence[float] | None
) -> tuple[float, ...]:
    if kind is not HISTOGRAM:
        if buckets is not None:
            raise model_error(f"Metric of {kind.name} '{name}': buckets are for HISTOGRAM families")
        return ()
    if buckets is None:
        raise model_error(
            f"Metric of HISTOGRAM '{name}' needs buckets=[...] (their upper bounds, "
            "strictly increasing; the +Inf bucket is always added)"
        )
    not_numbers = model_error(f"Metric of HISTOGRAM '{name}': buckets must be a list of numbers")
    if isinstance(buckets, str) or not isinstance(buckets, Iterable):
        raise not_numbers
    values: list[float] = []
    for bound in buckets:
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
            raise not_numbers
        values.append(float(bound))
    bounds = tuple(values)
    if any(not math.isfinite(b) for b in bounds):
        raise model_error(
            f"Metric of HISTOGRAM '{name}': bucket bounds must be finite, got "
            f"{list(bounds)} (the +Inf bucket is always added)"
        )
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise model_error(
            f"Metric of HISTOGRAM '{name}': buckets must be strictly increasing, got {list(bounds)}"
        )
    return bounds
