"""Triton's trace settings (the TraceSetting RPC) as the sampling policy of one service.

Data flow: ``tracing_sdk`` builds one ``TraceSettingsStore`` from ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG`` at start; its sampler asks ``should_sample`` for every span started;
TraceSetting (gRPC and HTTP) reads and changes the store at run time through ``get`` / ``update``.
Pure Python (no OpenTelemetry SDK), thread safe (BLS client spans start in worker threads).

Settings, with Triton's names and string values:

- ``trace_level``: ``["OFF"]`` (no span at all, even under a sampled parent) or
  ``["TIMESTAMPS"]`` (spans with their timings). ``TENSORS`` is not supported.
- ``trace_rate``: sample 1 new trace in N (the N-th, 2N-th, ... request that starts a trace here);
  ``0`` starts none. A request whose caller (client or gateway) sent a sampled ``traceparent`` is
  traced whatever the rate when the sampler is parent-based (the default), so one trace is never
  cut in the middle.
- ``trace_count``: how many more traces to sample (``-1``: no limit); it counts down, once per
  trace where the trace enters the mesh: the first service that samples a trace marks it in the
  W3C ``tracestate`` (``meshserve=1``), and the services its calls reach follow it uncounted.
- ``log_frequency`` (``0``) and ``trace_mode`` (``opentelemetry``) are reported only: spans go
  out over OTLP in batches (``OTEL_BSP_*``), not to trace files. ``trace_file`` is not reported.

Scopes follow Triton: settings without a model name are global; with ``model_name`` they override
the global ones for that model only (the sampler sees the model name as a span attribute).
An empty value list clears a setting: a model's override goes (the global value applies again),
a global setting returns to its value at start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from services.core.errors import InvalidArgument

log = logging.getLogger(__name__)

LEVEL = "trace_level"
RATE = "trace_rate"
COUNT = "trace_count"
LOG_FREQUENCY = "log_frequency"
MODE = "trace_mode"
TRACE_FILE = "trace_file"
#: settings TraceSetting may change
SETTABLE = (LEVEL, RATE, COUNT)
LEVELS = ("OFF", "TIMESTAMPS")


@dataclass(frozen=True, slots=True)
class TraceSettings:
    """One scope's sampling settings (global, or a model's after its overrides)."""

    level: str = "TIMESTAMPS"
    #: sample 1 new trace in ``rate``; 0 = none
    rate: int = 1
    #: traces left to sample; -1 = unlimited
    count: int = -1


def settings_from_sampler(name: str, arg: str) -> tuple[TraceSettings, bool]:
    """Start settings and parent-following from ``OTEL_TRACES_SAMPLER`` / ``..._SAMPLER_ARG``.

    ``always_on`` rate 1; ``always_off`` level OFF; ``traceidratio`` with ratio r: rate
    round(1/r) (0 when r is 0); the ``parentbased_`` forms also follow a remote parent's decision
    (and ``parentbased_always_off`` starts no trace of its own: rate 0).
    """
    sampler = (name or "parentbased_always_on").strip().lower()
    follow_parent = sampler.startswith("parentbased_")
    root = sampler.removeprefix("parentbased_")
    if root == "always_on":
        return TraceSettings(), follow_parent
    if root == "always_off":
        if follow_parent:
            return TraceSettings(rate=0), True
        return TraceSettings(level="OFF"), False
    if root == "traceidratio":
        try:
            ratio = float(arg) if arg.strip() else 1.0
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; sampling every trace", arg)
            ratio = 1.0
        ratio = min(max(ratio, 0.0), 1.0)
        return TraceSettings(rate=round(1 / ratio) if ratio > 0 else 0), follow_parent
    log.warning(
        "OTEL_TRACES_SAMPLER=%r is not supported here (always_on, always_off, traceidratio and "
        "their parentbased_ forms are); using parentbased_always_on",
        name,
    )
    return TraceSettings(), True


def _one_value(name: str, values: Sequence[str]) -> str:
    if len(values) != 1:
        raise InvalidArgument(f"trace setting '{name}' takes one value, got {list(values)}")
    return values[0].strip()


def _integer(name: str, values: Sequence[str], minimum: int) -> int:
    text = _one_value(name, values)
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(f"trace setting '{name}' must be an integer, got '{text}'") from None
    if value < minimum:
        raise InvalidArgument(f"trace setting '{name}' must be >= {minimum}, got {value}")
    return value


def _level(values: Sequence[str]) -> str:
    levels = {v.strip().upper() for v in values}
    unsupported = sorted(levels - set(LEVELS))
    if unsupported:
        raise InvalidArgument(
            f"trace_level {unsupported} is not supported: use OFF or TIMESTAMPS "
            "(spans carry timings, never tensor contents)"
        )
    if levels == {"OFF"} or not levels:
        return "OFF"
    if "OFF" in levels:
        raise InvalidArgument("trace_level cannot be OFF and TIMESTAMPS at once")
    return "TIMESTAMPS"


def parse_updates(updates: Mapping[str, Sequence[str]]) -> dict[str, str | int | None]:
    """Validate TraceSetting values; None marks a setting to clear (an empty value list)."""
    parsed: dict[str, str | int | None] = {}
    for name, values in updates.items():
        if name in (LOG_FREQUENCY, MODE, TRACE_FILE):
            if values:
                raise InvalidArgument(
                    f"trace setting '{name}' cannot be changed here: spans are exported over "
                    "OTLP (--trace-config opentelemetry,... or the OTEL_* variables), not to "
                    "trace files; trace_level, trace_rate and trace_count can be changed"
                )
            continue
        if name not in SETTABLE:
            raise InvalidArgument(
                f"unknown trace setting '{name}'; expected one of {', '.join(SETTABLE)}"
            )
        if not values:
            parsed[name] = None
        elif name == LEVEL:
            parsed[name] = _level(values)
        elif name == RATE:
            parsed[name] = _integer(name, values, 0)
        else:
            parsed[name] = _integer(name, values, -1)
    return parsed


def updates_from_json(doc: Mapping[str, object]) -> dict[str, list[str]]:
    """The HTTP form of an update (a string, a list of strings, or null to clear) as lists."""
    updates: dict[str, list[str]] = {}
    for name, value in doc.items():
        if value is None:
            updates[name] = []
        elif isinstance(value, str | int) and not isinstance(value, bool):
            updates[name] = [str(value)]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            updates[name] = [str(v) for v in value]
        else:
            raise InvalidArgument(
                f"trace setting '{name}' must be a string, a list of strings or null, got {value!r}"
            )
    return updates


def settings_to_json(settings: Mapping[str, list[str]]) -> dict[str, str | list[str]]:
    """Settings as Triton's HTTP API renders them: trace_level a list, the others a string."""
    return {name: values if name == LEVEL else values[0] for name, values in settings.items()}


def _apply(settings: TraceSettings, name: str, value: str | int) -> TraceSettings:
    if name == LEVEL:
        return replace(settings, level=str(value))
    if name == RATE:
        return replace(settings, rate=int(value))
    return replace(settings, count=int(value))


class TraceSettingsStore:
    """Global and per-model trace settings, and the sampling decision they make."""

    def __init__(self, defaults: TraceSettings, follow_parent: bool = True) -> None:
        self.defaults = defaults
        #: whether a remote parent's sampled flag decides (ParentBased semantics)
        self.follow_parent = follow_parent
        self._lock = threading.Lock()
        self._global = defaults
        self._models: dict[str, dict[str, str | int]] = {}
        #: per scope ("" = global, else a model with its own rate / count): requests seen, and
        #: traces left to sample
        self._seen: dict[str, int] = {}
        self._left: dict[str, int] = {"": defaults.count}
        self._disabled = False

    # ---- TraceSetting ----------------------------------------------------------------------------
    def get(self, model: str = "") -> dict[str, list[str]]:
        """The settings of a scope as TraceSetting answers them (every value a list of strings)."""
        with self._lock:
            effective = self._effective(model)
            left = self._left.get(self._count_scope(model), effective.count)
        return {
            LEVEL: [effective.level],
            RATE: [str(effective.rate)],
            COUNT: [str(left)],
            LOG_FREQUENCY: ["0"],
            MODE: ["opentelemetry"],
        }

    def update(self, model: str, updates: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """Apply TraceSetting values (all or none: InvalidArgument names the bad one)."""
        parsed = parse_updates(updates)
        with self._lock:
            if model:
                overrides = self._models.setdefault(model, {})
                for name, value in parsed.items():
                    if value is None:
                        overrides.pop(name, None)
                    else:
                        overrides[name] = value
                if not overrides:
                    del self._models[model]
            else:
                for name, value in parsed.items():
                    default = getattr(self.defaults, name.removeprefix("trace_"))
                    self._global = _apply(self._global, name, default if value is None else value)
            if RATE in parsed:
                self._seen.pop(model, None)
            if COUNT in parsed:
                if model and COUNT not in self._models.get(model, {}):
                    self._left.pop(model, None)
                else:
                    self._left[model] = self._effective(model).count
        log.info("trace settings%s: %s", f" of model '{model}'" if model else "", parsed)
        return self.get(model)

    def disable(self) -> None:
        """Sample nothing from now on (the exporter is shutting down)."""
        with self._lock:
            self._disabled = True

    # ---- sampling --------------------------------------------------------------------------------
    def should_sample(
        self,
        model: str,
        *,
        parent_valid: bool,
        parent_remote: bool,
        parent_sampled: bool,
        counted: bool = False,
    ) -> bool:
        """Whether a span starting now is sampled.

        A local parent (a span of this process) is always followed, so a trace is whole or
        absent; a remote parent is followed when ``follow_parent``; otherwise the span starts a
        trace here and the rate and count decide. The count takes each trace once in the mesh:
        a sampled remote parent that a meshserve service already ``counted`` (an ensemble step,
        a BLS call) is followed without counting it again.
        """
        with self._lock:
            if self._disabled:
                return False
            effective = self._effective(model)
            if effective.level == "OFF":
                return False
            if parent_valid and not parent_remote:
                return parent_sampled
            if not (parent_valid and self.follow_parent):
                scope = model if RATE in self._models.get(model, {}) else ""
                seen = self._seen[scope] = self._seen.get(scope, 0) + 1
                if effective.rate == 0 or seen % effective.rate != 0:
                    return False
            elif not parent_sampled:
                return False
            elif counted:
                return True
            scope = self._count_scope(model)
            left = self._left.get(scope, effective.count)
            if left == 0:
                return False
            if left > 0:
                self._left[scope] = left - 1
            return True

    def _effective(self, model: str) -> TraceSettings:
        settings = self._global
        for name, value in self._models.get(model, {}).items() if model else ():
            settings = _apply(settings, name, value)
        return settings

    def _count_scope(self, model: str) -> str:
        return model if model and COUNT in self._models.get(model, {}) else ""
