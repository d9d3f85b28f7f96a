"""LogSettings (Triton's logging extension): read and change the service's log levels at run time.

Keys as Triton names them: log_info, log_warning, log_error (bool), log_verbose_level (uint32),
log_format ("default" | "ISO8601"), log_file (string; only "" is accepted: logs go to stderr).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from services.core.errors import InvalidArgument

SettingValue = str | int | bool

_TYPES: dict[str, type] = {
    "log_info": bool,
    "log_warning": bool,
    "log_error": bool,
    "log_verbose_level": int,
    "log_format": str,
    "log_file": str,
}


def current_settings(state: Mapping[str, SettingValue]) -> dict[str, SettingValue]:
    base: dict[str, SettingValue] = {
        "log_info": True,
        "log_warning": True,
        "log_error": True,
        "log_verbose_level": 0,
        "log_format": "default",
        "log_file": "",
    }
    base.update(state)
    return base


def apply_log_settings(
    state: dict[str, SettingValue], updates: Mapping[str, SettingValue]
) -> dict[str, SettingValue]:
    """Validate ``updates``, store them in ``state``, set logger levels; return all settings."""
    for key, value in updates.items():
        expected = _TYPES.get(key)
        if expected is None:
            raise InvalidArgument(
                f"unknown log setting '{key}'; known: {', '.join(sorted(_TYPES))}"
            )
        if type(value) is not expected:
            raise InvalidArgument(
                f"log setting '{key}' takes a {expected.__name__}, got {type(value).__name__}"
            )
        if key == "log_format" and value not in ("default", "ISO8601"):
            raise InvalidArgument("log_format must be 'default' or 'ISO8601'")
        if key == "log_file" and value:
            raise InvalidArgument("log_file is not supported: meshserve services log to stderr")
    state.update(updates)
    settings = current_settings(state)
    if int(settings["log_verbose_level"]) > 0:
        level = logging.DEBUG
    elif settings["log_info"]:
        level = logging.INFO
    elif settings["log_warning"]:
        level = logging.WARNING
    elif settings["log_error"]:
        level = logging.ERROR
    else:
        level = logging.CRITICAL
    for name in ("services", "control_plane"):
        logging.getLogger(name).setLevel(level)
    return settings
