"""LogSettings (Triton's logging extension): read and change the service's log levels at run time.

Keys as Triton names them: log_info, log_warning, log_error (bool), log_verbose_level (uint32),
log_format ("default" | "ISO8601": UTC timestamps, ``2026-11-22T08:15:02Z``), log_file (string).
``configure_logging`` sets the process up at start from ``--log-level`` and tritonserver's
``--log-*`` flags (server_flags.py): logs go to stderr, or are appended to ``--log-file``. At run
time the file cannot be changed (a client could otherwise have the server write any path it can
write); an update naming the current file is accepted.
"""

from __future__ import annotations

import logging
import sys
import time
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
        if key == "log_file" and value != state.get("log_file", ""):
            raise InvalidArgument(
                "log_file cannot be changed at run time: start the service with --log-file"
            )
    state.update(updates)
    settings = current_settings(state)
    _set_levels(settings)
    if "log_format" in updates:
        formatter = log_formatter(str(settings["log_format"]))
        for handler in logging.getLogger().handlers:
            handler.setFormatter(formatter)
    return settings


def _set_levels(settings: Mapping[str, SettingValue]) -> None:
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


def log_formatter(log_format: str) -> logging.Formatter:
    """Our line format with local times ("default"), or with ISO 8601 UTC times."""
    line = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if log_format != "ISO8601":
        return logging.Formatter(line)
    formatter = logging.Formatter(line, datefmt="%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    return formatter


def configure_logging(level: str, initial: Mapping[str, SettingValue]) -> None:
    """Set up the process's logging at start: ``level`` (``--log-level``) for every logger, then
    tritonserver's ``--log-*`` settings (``initial``, by Triton's keys; LogSettings starts from
    them too). OSError when the log file cannot be opened."""
    log_file = str(initial.get("log_file", ""))
    handler: logging.Handler = (
        logging.FileHandler(log_file, encoding="utf-8")
        if log_file
        else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(log_formatter(str(initial.get("log_format", "default"))))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if initial:
        _set_levels(current_settings(initial))
