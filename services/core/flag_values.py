"""Values of command-line flags and settings, checked alike everywhere (server_flags,
trace_config, otlp_env, the gateway's TLS flags)."""

from __future__ import annotations

import os
from pathlib import Path


def readable_file(path: str) -> bool:
    """Whether ``path`` names a file this process can read (a certificate, a key)."""
    return Path(path).is_file() and os.access(path, os.R_OK)


def whole_number(flag: str, text: str, least: int) -> int:
    """``text`` as an integer >= ``least``; ValueError naming ``flag`` otherwise."""
    try:
        value = int(text.strip())
    except ValueError:
        value = least - 1
    if value < least:
        raise ValueError(f"{flag}={text}: give a whole number >= {least}")
    return value
