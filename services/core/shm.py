"""Shared-memory regions: POSIX system shared memory, and the CUDA stand-in for CPU-only hosts.

Where it sits in the data flow: the SystemSharedMemory* RPCs (and the REST
``v2/systemsharedmemory`` routes) register regions here. When an input carries the
``shared_memory_region`` parameters, the transport calls ``read()`` and decodes the tensor from the
returned memoryview without copying; when an output asks for a region, the transport calls
``write()`` with the output's bytes after the batch ran.

A region is a window ``[offset, offset + byte_size)`` of the POSIX shared-memory object ``key``, as
``tritonclient.utils.shared_memory.create_shared_memory_region(name, key, size)`` creates it
(``shm_open(key)``; on Linux the object is the file ``/dev/shm/<key without leading slashes>``).
Offsets given to ``read``/``write`` are relative to the start of the region, as in Triton.

Semantics follow Triton: a second region under a name already registered is ALREADY_EXISTS;
unregistering a name that is not registered succeeds and does nothing; ``status`` of an unknown
name is NOT_FOUND; an empty name means "all regions".

Unregistering while a tensor still views the region: ``mmap.close()`` raises BufferError while
memoryviews/numpy arrays over the mapping are alive. The region then leaves the table at once
(new requests cannot use it), and the mapping stays until the last view is gone: the views hold
the mmap object, whose deallocation unmaps it. Nothing crashes and nothing is unmapped under a
reader.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.core.errors import AlreadyExists, InvalidArgument, NotFound, Unsupported

#: where Linux exposes POSIX shared-memory objects
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """A registered region as the status RPCs report it."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(slots=True)
class _Region:
    info: RegionInfo
    mapping: mmap.mmap
    #: the region's bytes inside the mapping (the mapping starts at a page boundary)
    view: memoryview


class SystemSharedMemory:
    """Registered POSIX shared-memory regions of this process. Thread-safe."""

    def __init__(self, shm_dir: Path = SHM_DIR) -> None:
        self._shm_dir = shm_dir
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Map ``byte_size`` bytes of shared-memory object ``key`` from ``offset`` as ``name``."""
        if not name:
            raise InvalidArgument("a shared memory region needs a non-empty name")
        if offset < 0 or byte_size <= 0:
            raise InvalidArgument(
                f"failed to register shared memory region '{name}': offset must be >= 0 and "
                f"byte_size > 0 (got offset {offset}, byte_size {byte_size})"
            )
        path = self._object_path(name, key)
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(
                    f"shared memory region '{name}' is already registered; unregister it first "
                    "or choose another name"
                )
            self._regions[name] = _map_region(RegionInfo(name, key, offset, byte_size), path)

    def unregister(self, name: str | None = None) -> None:
        """Drop region ``name``; None or "" drops every region. An unknown name is not an error."""
        with self._lock:
            if name:
                dropped = [self._regions.pop(name)] if name in self._regions else []
            else:
                dropped = list(self._regions.values())
                self._regions.clear()
        for region in dropped:
            _release(region)

    def status(self, name: str | None = None) -> list[RegionInfo]:
        """The registered regions (sorted by name), or only ``name`` (NotFound if unknown)."""
        with self._lock:
            if not name:
                return [self._regions[n].info for n in sorted(self._regions)]
            region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find system shared memory region: '{name}'")
        return [region.info]

    def read(
        self, region: str, offset: int, byte_size: int, *, tensor: str | None = None
    ) -> memoryview:
        """``byte_size`` bytes of ``region`` from ``offset``, as a view over the mapping (no copy).

        The view is read-only, like tensors decoded from a request body: inputs belong to the
        client. ``tensor`` names the input in error messages.
        """
        found = self._get(region, tensor, "input")
        _check_bounds(found.info, offset, byte_size, tensor, "input")
        return found.view[offset : offset + byte_size].toreadonly()

    def write(
        self,
        region: str,
        offset: int,
        data: bytes | bytearray | memoryview | np.ndarray,
        *,
        tensor: str | None = None,
    ) -> None:
        """Copy ``data`` into ``region`` from ``offset``; ``tensor`` names the output in errors."""
        found = self._get(region, tensor, "output")
        source = _as_bytes_view(data, tensor)
        _check_bounds(found.info, offset, source.nbytes, tensor, "output")
        found.view[offset : offset + source.nbytes] = source

    def close(self) -> None:
        """Unregister every region (same as ``unregister(None)``)."""
        self.unregister(None)

    # ------------------------------------------------------------------------------ helpers

    def _object_path(self, name: str, key: str) -> Path:
        stripped = key.lstrip("/")
        if not stripped or "/" in stripped or stripped in (".", ".."):
            raise InvalidArgument(
                f"failed to register shared memory region '{name}': key '{key}' is not a POSIX "
                "shared memory name; use one name with at most a leading '/', e.g. '/input0'"
            )
        if not self._shm_dir.is_dir():
            raise Unsupported(
                f"system shared memory needs {self._shm_dir} (Linux); this host has none"
            )
        return self._shm_dir / stripped

    def _get(self, name: str, tensor: str | None, role: str) -> _Region:
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            subject = f"{role} '{tensor}' names" if tensor else "the request names"
            raise NotFound(
                f"{subject} shared memory region '{name}', which is not registered; "
                "register it first (SystemSharedMemoryRegister)"
            )
        return region


def _map_region(info: RegionInfo, path: Path) -> _Region:
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise NotFound(
            f"failed to register shared memory region '{info.name}': no shared memory object "
            f"with key '{info.key}'; create it first (e.g. create_shared_memory_region)"
        ) from None
    except OSError as exc:
        raise InvalidArgument(
            f"failed to register shared memory region '{info.name}': cannot open key "
            f"'{info.key}' ({exc.strerror})"
        ) from None
    try:
        object_size = os.fstat(fd).st_size
        end = info.offset + info.byte_size
        if end > object_size:
            raise InvalidArgument(
                f"failed to register shared memory region '{info.name}': offset {info.offset} + "
                f"byte_size {info.byte_size} = {end} is past the end of key '{info.key}' "
                f"({object_size} bytes)"
            )
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, end - start, offset=start)
    finally:
        os.close(fd)
    skip = info.offset - start
    view = memoryview(mapping)[skip : skip + info.byte_size]
    return _Region(info=info, mapping=mapping, view=view)


def _release(region: _Region) -> None:
    region.view.release()
    # BufferError: views handed out by read() are still alive; they keep the mmap object, which
    # unmaps itself when the last of them is gone.
    with contextlib.suppress(BufferError):
        region.mapping.close()


def _check_bounds(
    info: RegionInfo, offset: int, byte_size: int, tensor: str | None, role: str
) -> None:
    if offset < 0 or byte_size < 0:
        raise InvalidArgument(
            f"shared memory offset and byte_size must be >= 0 for region '{info.name}' "
            f"(got offset {offset}, byte_size {byte_size})"
        )
    available = max(info.byte_size - offset, 0)
    if byte_size > available:
        subject = f"{role} '{tensor}'" if tensor else role.capitalize()
        raise InvalidArgument(
            f"{subject} needs {byte_size} bytes but region '{info.name}' has {available} "
            f"from offset {offset} (region size {info.byte_size})"
        )


def _as_bytes_view(
    data: bytes | bytearray | memoryview | np.ndarray, tensor: str | None
) -> memoryview:
    if isinstance(data, np.ndarray):
        if data.dtype == np.object_:
            what = f"output '{tensor}'" if tensor else "an object array"
            raise InvalidArgument(
                f"{what} must be serialized (BYTES: 4-byte length + bytes per element) "
                "before it is written to shared memory"
            )
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# ---------------------------------------------------------------------------------- CUDA


def _torch_sees_gpu() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    torch = importlib.import_module("torch")
    return bool(torch.cuda.is_available())


class CudaSharedMemory:
    """CUDA shared memory (IPC handles); this server holds no region, so it refuses registration.

    GPU detection asks torch, only when a registration comes and only if torch is installed
    (``gpu_available`` replaces the check, e.g. in tests).
    """

    def __init__(self, gpu_available: Callable[[], bool] | None = None) -> None:
        self._gpu_available = gpu_available or _torch_sees_gpu
        self._has_gpu: bool | None = None

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Always Unsupported: with no GPU, or (with one) since this build has no CUDA IPC."""
        if self._has_gpu is None:
            self._has_gpu = self._gpu_available()
        if not self._has_gpu:
            raise Unsupported("CUDA shared memory needs a GPU; this server found none")
        raise Unsupported(
            f"cannot register CUDA shared memory region '{name}': this server does not support "
            "CUDA shared memory yet; use system shared memory instead"
        )

    def unregister(self, name: str | None = None) -> None:
        """Nothing is ever registered, so there is nothing to drop; always succeeds."""

    def status(self, name: str | None = None) -> list[RegionInfo]:
        """No regions; a named region is NotFound (as Triton answers)."""
        if name:
            raise NotFound(f"Unable to find cuda shared memory region: '{name}'")
        return []
