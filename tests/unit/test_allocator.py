"""services/core/allocator.py: glibc malloc settings for the torch and Python services."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from services.core import allocator

GLIBC = platform.libc_ver()[0] == "glibc"


def _tune_in_child(env: dict[str, str]) -> str:
    """Run tune_for_tensors() in a fresh interpreter (it changes process-wide malloc state)."""
    code = "from services.core.allocator import tune_for_tensors as t; print(t())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning applies to glibc only")
def test_applied_on_glibc() -> None:
    env = {k: v for k, v in os.environ.items() if k not in allocator.GLIBC_ENV}
    assert _tune_in_child({**env, allocator.ENV_SWITCH: "1"}) == "True"


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.tune_for_tensors() is False


def test_glibc_tunables_from_the_operator_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator.tune_for_tensors() is False
