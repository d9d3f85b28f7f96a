"""The OpenTelemetry exporter variables that say how to reach a collector, beyond its address.

The services' SDK exporters read these themselves. The gateway's tracer is configured by the
control plane, so it reads them here (``control_plane.collector``) and Envoy reaches the same
collector the same way. ``problem`` checks them once at start (``meshserve up``, a service, the
control plane), so that a wrong path fails the start with its name instead of every export:

- ``OTEL_EXPORTER_OTLP_CERTIFICATE``: the CA file that an ``https://`` collector's certificate is
  verified with (unset: the system's roots);
- ``OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`` and ``..._CLIENT_KEY``: the client's certificate
  and key, for a collector that asks for one (mutual TLS);
- ``OTEL_EXPORTER_OTLP_HEADERS``: ``key=value`` pairs, comma-separated and percent-encoded, sent
  with every export (e.g. a hosted collector's API key);
- ``OTEL_RESOURCE_ATTRIBUTES``: resource attributes in the same form.

Each ``OTEL_EXPORTER_OTLP_*`` one has a ``OTEL_EXPORTER_OTLP_TRACES_*`` form that comes first,
as in the OpenTelemetry specification.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote

from services.core.flag_values import readable_file

CA_FILE = "CERTIFICATE"
CLIENT_CERTIFICATE = "CLIENT_CERTIFICATE"
CLIENT_KEY = "CLIENT_KEY"
HEADERS = "HEADERS"
RESOURCE_ENV = "OTEL_RESOURCE_ATTRIBUTES"
_FILES = {
    CA_FILE: "the CA certificate the collector's certificate is verified with",
    CLIENT_CERTIFICATE: "the client certificate shown to the collector",
    CLIENT_KEY: "the client certificate's private key",
}


def lookup(env: Mapping[str, str], setting: str) -> tuple[str, str]:
    """(variable, value) of an exporter setting: the ``TRACES_`` form first; ("", "") unset."""
    for name in (f"OTEL_EXPORTER_OTLP_TRACES_{setting}", f"OTEL_EXPORTER_OTLP_{setting}"):
        value = env.get(name, "").strip()
        if value:
            return name, value
    return "", ""


def tls_files(env: Mapping[str, str]) -> dict[str, str]:
    """The TLS files set (``CA_FILE``, ``CLIENT_CERTIFICATE``, ``CLIENT_KEY`` → path)."""
    return {setting: path for setting in _FILES if (path := lookup(env, setting)[1])}


def key_values(name: str, text: str) -> tuple[tuple[str, str], ...]:
    """``k1=v1,k2=v2`` (values percent-encoded) as pairs; ValueError naming ``name`` otherwise."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{name}: '{item.strip()}' is not key=value (give k1=v1,k2=v2)")
        pairs.append((unquote(key.strip()), unquote(value.strip())))
    return tuple(pairs)


def headers(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The headers sent with every export, names in lower case."""
    name, text = lookup(env, HEADERS)
    return tuple((key.lower(), value) for key, value in key_values(name, text))


def resource_attributes(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return key_values(RESOURCE_ENV, env.get(RESOURCE_ENV, ""))


def problem(env: Mapping[str, str]) -> str | None:
    """What is wrong with these variables (None: nothing): a TLS file that cannot be read, a
    client certificate without its key, or headers and attributes not in ``k=v`` form."""
    for setting, role in _FILES.items():
        name, path = lookup(env, setting)
        if path and not readable_file(path):
            return f"{name}={path}: no such readable file ({role})"
    files = tls_files(env)
    if (CLIENT_CERTIFICATE in files) != (CLIENT_KEY in files):
        return (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together: "
            "set both or neither"
        )
    try:
        headers(env)
        resource_attributes(env)
    except ValueError as exc:
        return str(exc)
    return None
