"""glibc malloc settings for services whose framework allocates through malloc (torch).

torch's CPU tensors come straight from malloc and go back to it after every operator. With
glibc's defaults, each large activation (ResNet-50 at batch 32: dozens of 10-100 MB tensors per
call) is a fresh ``mmap`` that is unmapped on free, or heap memory trimmed back to the system, so
every call page-faults its working set in again: measured on the 2-core VM, ~1.1 million minor
faults per batch-32 call, 2.5 s instead of 1.4 s (batch 10: 530 → 470 ms). Worker threads
(where the kit runs ``infer``) have their own arenas whose heaps cannot hold chunks over 64 MB,
so those are always mmapped there.

``tune_for_tensors()`` therefore makes the process keep its memory: one arena for all threads
(``M_ARENA_MAX`` 1, so worker threads allocate from the main heap, which can grow as needed), no
mmapped chunks (``M_MMAP_MAX`` 0) and free memory at the top of the heap kept up to 1 GiB
(``M_TRIM_THRESHOLD``). The cost is a resident size that stays near its peak, which a server
doing the same work batch after batch reaches anyway. onnxruntime and TensorFlow use their own
arenas and are unaffected (measured: no page faults either way), so only the torch and Python
services call this, first thing in ``main`` (before any thread exists). It is a no-op off glibc;
``MESHSERVE_MALLOC_TUNING=0`` turns it off, as do glibc's own ``MALLOC_*`` environment tunables
when set (the operator's choice wins).
"""

from __future__ import annotations

import ctypes
import os

#: glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
#: free memory at the top of the heap kept for reuse before any is returned to the system
TRIM_THRESHOLD = 1 << 30
ENV_SWITCH = "MESHSERVE_MALLOC_TUNING"
#: glibc environment tunables; when the operator sets any, their choice stands
GLIBC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def tune_for_tensors() -> bool:
    """Apply the settings above to this process; True when they were applied."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if any(name in os.environ for name in GLIBC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):  # no mallopt (not glibc): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(mallopt(param, value) == 1 for param, value in settings)
