"""How `meshserve up` starts its children (control plane, Envoy, services).

Each child gets a session of its own, so a Ctrl-C in the terminal (SIGINT to the whole foreground
process group) reaches only the supervisor, which then stops the children in order (callers
first, see supervisor.py) instead of all of them at once. So that no child outlives a supervisor
that was killed, each asks the kernel for SIGTERM when its parent dies (Linux prctl
PR_SET_PDEATHSIG; elsewhere this part is skipped).
"""

from __future__ import annotations

import ctypes
import signal
import sys
from typing import Any

#: prctl option: signal this process when its parent thread exits
_PR_SET_PDEATHSIG = 1
#: looked up here, in the parent: the child, between fork and exec, only calls it
_prctl = (
    getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform == "linux" else None
)


def _term_when_parent_dies() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def child_process_options() -> dict[str, Any]:
    """Keyword arguments for ``asyncio.create_subprocess_exec`` / ``subprocess.Popen``."""
    options: dict[str, Any] = {"start_new_session": True}
    if _prctl is not None:
        options["preexec_fn"] = _term_when_parent_dies
    return options
