"""deploy/children.py: a child of `meshserve up` has its own session and dies with its parent."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.children import child_process_options


def test_child_has_its_own_session() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], **child_process_options()
    )
    try:
        assert os.getsid(child.pid) == child.pid != os.getsid(0)  # Ctrl-C's SIGINT misses it
    finally:
        child.kill()
        child.wait(10)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_child_is_terminated_when_its_parent_dies() -> None:
    # a middle process starts the grandchild with the options, prints its pid, then is killed
    script = (
        "import subprocess, sys, time\n"
        "from deploy.children import child_process_options\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "**child_process_options())\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    middle = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert middle.stdout is not None
        grandchild = int(middle.stdout.readline())
        os.kill(grandchild, 0)  # alive
        middle.kill()
        middle.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(grandchild, 0)
            except ProcessLookupError:
                return  # gone with its parent
            # a zombie until init reaps it counts as gone too
            with contextlib.suppress(FileNotFoundError):
                if Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z":
                    return
            time.sleep(0.05)
        os.kill(grandchild, 9)
        pytest.fail("the child outlived its killed parent")
    finally:
        middle.kill()
