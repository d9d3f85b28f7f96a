"""Values of command-line flags, checked alike everywhere (server_flags, trace_config)."""

from __future__ import annotations


def whole_number(flag: str, text: str, least: int) -> int:
    """``text`` as an integer >= ``least``; ValueError naming ``flag`` otherwise."""
    try:
        value = int(text.strip())
    except ValueError:
        value = least - 1
    if value < least:
        raise ValueError(f"{flag}={text}: give a whole number >= {least}")
    return value
