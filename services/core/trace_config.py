"""Triton's tracing flags (``--trace-config`` and the older ``--trace-*``) as this mesh's tracing.

Data flow: ``server_flags`` collects the flags as given and ``parse`` turns them into one
``TraceFlags``; ``tracing_sdk.build`` exports a service's spans with it, and ``meshserve up``
hands the same flags to every service and (``as_trace_config``) to the control plane, which
points Envoy's tracer at the same collector (``control_plane.tracing.gateway_tracing``).

What Triton's flags mean here:

- ``--trace-config mode=opentelemetry`` with ``--trace-config opentelemetry,url=HOST:PORT/PATH``
  (default ``http://localhost:4318/v1/traces``): spans go over OTLP/HTTP to that URL, as in
  Triton. ``opentelemetry,resource=KEY=VALUE`` (repeatable) adds resource attributes
  (``service.name`` replaces ``meshserve-<family>``); ``opentelemetry,bsp_max_queue_size``,
  ``bsp_schedule_delay`` (ms) and ``bsp_max_export_batch_size`` tune the batch span processor.
  Any ``opentelemetry,`` setting implies the mode. Triton's defaults apply to the global
  settings not given: ``level`` OFF (no spans until ``level=TIMESTAMPS`` or TraceSetting),
  ``rate`` 1000, ``count`` -1; the ``OTEL_TRACES_SAMPLER`` variables are then not read.
- Without the mode, the global settings (``rate``, ``level``, ``count``, or ``--trace-rate``,
  ``--trace-level``, ``--trace-count``) start the sampling of the tracing the ``OTEL_*``
  variables set up; ``collector_problem`` refuses ``level=TIMESTAMPS`` when nothing names a
  collector, rather than trace into nothing.
- Triton's own mode (``mode=triton``, ``triton,file=``, ``triton,log-frequency=``,
  ``--trace-file``, ``--trace-log-frequency``) writes trace files, which meshserve does not:
  refused with the way to get spans instead, as is ``level=TENSORS`` (spans carry timings only;
  Triton's OpenTelemetry mode has no TENSORS either).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.core import otlp_env
from services.core.flag_values import whole_number
from services.core.trace_settings import TraceSettings

#: the tritonserver flags this module reads (server_flags registers them)
FLAGS = (
    "--trace-config",
    "--trace-level",
    "--trace-rate",
    "--trace-count",
    "--trace-file",
    "--trace-log-frequency",
)
OPENTELEMETRY = "opentelemetry"
#: Triton's default collector URL in OpenTelemetry mode (OTLP/HTTP)
DEFAULT_URL = "http://localhost:4318/v1/traces"
#: Triton's start values of the global settings
TRITON_DEFAULTS = TraceSettings(level="OFF", rate=1000, count=-1)
#: ``opentelemetry,bsp_*`` settings → BatchSpanProcessor's arguments, with the SDK's defaults
BSP_SETTINGS = {
    "bsp_max_queue_size": ("max_queue_size", 2048),
    "bsp_schedule_delay": ("schedule_delay_millis", 5000),
    "bsp_max_export_batch_size": ("max_export_batch_size", 512),
}
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
_DEPRECATED = {"--trace-level": "level", "--trace-rate": "rate", "--trace-count": "count"}
_TRITON_MODE = (
    "Triton's trace files (mode triton) are not written here; spans go to an OpenTelemetry "
    "collector: give --trace-config mode=opentelemetry and --trace-config "
    "opentelemetry,url=HOST:PORT/v1/traces (or set OTEL_EXPORTER_OTLP_ENDPOINT for OTLP/gRPC)"
)


@dataclass(frozen=True, slots=True)
class TraceFlags:
    """What Triton's tracing flags asked for (defaults: none given)."""

    #: "" (not given: the OTEL_* variables decide) or "opentelemetry"
    mode: str = ""
    #: the OTLP/HTTP traces URL (mode opentelemetry)
    url: str = ""
    #: resource attributes, in the order given
    resource: tuple[tuple[str, str], ...] = ()
    #: BatchSpanProcessor arguments given (``BSP_SETTINGS``' names)
    bsp: tuple[tuple[str, int], ...] = ()
    level: str | None = None
    rate: int | None = None
    count: int | None = None

    def start_settings(self, base: TraceSettings) -> TraceSettings:
        """``base`` (Triton's defaults in mode opentelemetry, else the sampler variables') with
        the global settings given."""
        if self.mode == OPENTELEMETRY:
            base = TRITON_DEFAULTS
        return TraceSettings(
            level=base.level if self.level is None else self.level,
            rate=base.rate if self.rate is None else self.rate,
            count=base.count if self.count is None else self.count,
        )

    def as_trace_config(self) -> list[str]:
        """The same settings as ``--trace-config`` values (what the control plane is given)."""
        values = [f"mode={self.mode}"] if self.mode else []
        values += [f"{OPENTELEMETRY},url={self.url}"] if self.url else []
        values += [f"{OPENTELEMETRY},resource={k}={v}" for k, v in self.resource]
        names = {arg: name for name, (arg, _) in BSP_SETTINGS.items()}
        values += [f"{OPENTELEMETRY},{names[arg]}={n}" for arg, n in self.bsp]
        for key in ("level", "rate", "count"):
            value = getattr(self, key)
            values += [] if value is None else [f"{key}={value}"]
        return values


def traces_url(text: str) -> str:
    """``host:port[/path]`` (or an http(s) URL) as a full URL; no path: ``/v1/traces``."""
    parts = urlsplit(text.strip() if "://" in text else f"http://{text.strip()}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"--trace-config {OPENTELEMETRY},url={text}: give HOST:PORT/PATH "
            f"(e.g. localhost:4318/v1/traces) or an http(s) URL"
        )
    try:
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise ValueError(f"--trace-config {OPENTELEMETRY},url={text}: bad port") from None
    return parts._replace(path=parts.path or "/v1/traces").geturl()


def _split(flag: str, text: str) -> tuple[str, str, str]:
    """(mode part, key, value) of one flag; a deprecated flag is its global key."""
    if flag in _DEPRECATED:
        return "", _DEPRECATED[flag], text
    if flag != "--trace-config":
        raise ValueError(f"{flag}={text} is not supported: {_TRITON_MODE}")
    head, setting = "", text
    if "," in text.split("=", 1)[0]:
        head, _, setting = text.partition(",")
    key, eq, value = setting.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"--trace-config {text}: give [<mode>,]<setting>=<value>")
    return head.strip().lower(), key.strip(), value.strip()


def parse(given: Sequence[tuple[str, str]]) -> TraceFlags:
    """The tracing flags given, in order; ValueError saying what to fix for a bad or refused one
    (a repeated setting: the last one counts, except ``resource``, which adds up)."""
    mode, url = "", ""
    resource: list[tuple[str, str]] = []
    bsp: dict[str, int] = {}
    found: dict[str, str | int] = {}
    for flag, text in given:
        head, key, value = _split(flag, text)
        if head == "triton" or (not head and key == "mode" and value.lower() == "triton"):
            raise ValueError(f"--trace-config {text} is not supported: {_TRITON_MODE}")
        if head == OPENTELEMETRY:
            mode = OPENTELEMETRY
            if key == "url":
                url = traces_url(value)
            elif key == "resource":
                name, eq, attribute = value.partition("=")
                if not eq or not name.strip():
                    raise ValueError(f"--trace-config {text}: give resource=<key>=<value>")
                resource.append((name.strip(), attribute.strip()))
            elif key in BSP_SETTINGS:
                bsp[BSP_SETTINGS[key][0]] = whole_number(f"--trace-config {head},{key}", value, 1)
            else:
                raise ValueError(
                    f"--trace-config {text}: unknown {OPENTELEMETRY} setting '{key}'; expected "
                    f"url, resource or {', '.join(BSP_SETTINGS)}"
                )
        elif head:
            raise ValueError(f"--trace-config {text}: the mode is triton or {OPENTELEMETRY}")
        elif key == "mode":
            if value.lower() != OPENTELEMETRY:
                raise ValueError(f"--trace-config mode={value}: give mode={OPENTELEMETRY}")
            mode = OPENTELEMETRY
        elif key == "level":
            found[key] = _level(value)
        elif key in ("rate", "count"):
            found[key] = whole_number(f"--trace-config {key}", value, 0 if key == "rate" else -1)
        else:
            raise ValueError(
                f"--trace-config {text}: unknown setting '{key}'; expected rate, level, count, "
                f"mode, or {OPENTELEMETRY},<setting>"
            )
    sizes = {arg: bsp.get(arg, default) for arg, default in BSP_SETTINGS.values()}
    if sizes["max_export_batch_size"] > sizes["max_queue_size"]:
        shown = {
            arg: f"{sizes[arg]}{'' if arg in bsp else ' (the default)'}"
            for arg in ("max_export_batch_size", "max_queue_size")
        }
        raise ValueError(
            f"--trace-config {OPENTELEMETRY},bsp_max_export_batch_size: "
            f"{shown['max_export_batch_size']} must not exceed bsp_max_queue_size: "
            f"{shown['max_queue_size']}"
        )
    level, rate, count = found.get("level"), found.get("rate"), found.get("count")
    return TraceFlags(
        mode=mode,
        url=(url or DEFAULT_URL) if mode else "",
        resource=tuple(resource),
        bsp=tuple(bsp.items()),
        level=None if level is None else str(level),
        rate=None if rate is None else int(rate),
        count=None if count is None else int(count),
    )


def _level(text: str) -> str:
    level = text.strip().upper()
    if level == "TENSORS":
        raise ValueError(
            "--trace-config level=TENSORS is not supported: spans carry timings, never tensor "
            "contents (as in Triton's OpenTelemetry mode); give level=TIMESTAMPS"
        )
    if level not in ("OFF", "TIMESTAMPS"):
        raise ValueError(f"--trace-config level={text}: give TIMESTAMPS or OFF")
    return level


def otlp_endpoint(env: Mapping[str, str]) -> str:
    """The OTLP/gRPC endpoint the environment names ("" = none); one without a scheme is taken
    as plaintext ``http://``."""
    endpoint = (env.get(TRACES_ENDPOINT_ENV) or env.get(ENDPOINT_ENV) or "").strip()
    if endpoint and "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    return endpoint


def collector_problem(flags: TraceFlags, env: Mapping[str, str]) -> str | None:
    """Why the tracing set up by the flags and ``env`` cannot start (None: it can): spans asked
    for that nothing would receive, or a collector named with exporter variables that are wrong
    (``otlp_env.problem``)."""
    endpoint = otlp_endpoint(env)
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        return f"{ENDPOINT_ENV}={endpoint}: give the collector as an http:// or https:// URL"
    if flags.mode or endpoint:
        return otlp_env.problem(env)
    if flags.level != "TIMESTAMPS":
        return None
    return (
        f"--trace-config level=TIMESTAMPS asks for spans, but no collector is named: {_TRITON_MODE}"
    )
