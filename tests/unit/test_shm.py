"""System shared memory against real POSIX regions made by tritonclient; the CUDA stand-in."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.utils.shared_memory as client_shm

from services.core.errors import AlreadyExists, InvalidArgument, NotFound, Unsupported
from services.core.shm import CudaSharedMemory, RegionInfo, SystemSharedMemory

REGION_BYTES = 64


@pytest.fixture
def key() -> str:
    return f"/meshserve_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client_region(key: str) -> Iterator[client_shm.SharedMemoryRegion]:
    handle = client_shm.create_shared_memory_region("client_region", key, REGION_BYTES)
    try:
        yield handle
    finally:
        client_shm.destroy_shared_memory_region(handle)


@pytest.fixture
def server() -> Iterator[SystemSharedMemory]:
    shm = SystemSharedMemory()
    try:
        yield shm
    finally:
        shm.close()


def test_reads_inputs_the_client_wrote(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    values = np.arange(8, dtype=np.float32)
    client_shm.set_shared_memory_region(client_region, [values], offset=16)
    server.register("in0", key, 16, 32)

    view = server.read("in0", 0, 32, tensor="INPUT0")

    assert view.readonly
    decoded = np.frombuffer(view, dtype=np.float32)
    np.testing.assert_array_equal(decoded, values)
    # zero copy: a later client write shows through the same view
    client_shm.set_shared_memory_region(client_region, [np.full(8, 7, np.float32)], offset=16)
    np.testing.assert_array_equal(decoded, np.full(8, 7, np.float32))
    del decoded, view


def test_writes_outputs_the_client_reads(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    server.register("out0", key, 8, 56)
    result = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)

    server.write("out0", 4, result, tensor="OUTPUT0")
    server.write("out0", 40, b"\x01\x02\x03\x04")

    read_back = client_shm.get_contents_as_numpy(client_region, np.int32, [2, 3], offset=12)
    np.testing.assert_array_equal(read_back, result)
    tail = client_shm.get_contents_as_numpy(client_region, np.uint8, [4], offset=48)
    np.testing.assert_array_equal(tail, [1, 2, 3, 4])


def test_writes_non_contiguous_arrays(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    server.register("out", key, 0, REGION_BYTES)
    matrix = np.arange(12, dtype=np.int16).reshape(3, 4)
    server.write("out", 0, matrix.T)
    read_back = client_shm.get_contents_as_numpy(client_region, np.int16, [4, 3])
    np.testing.assert_array_equal(read_back, matrix.T)


def test_bounds_errors_name_tensor_region_and_sizes(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    server.register("r", key, 0, 16)
    with pytest.raises(InvalidArgument) as raised:
        server.write("r", 8, np.zeros(4, np.float32), tensor="X")
    assert raised.value.message == (
        "output 'X' needs 16 bytes but region 'r' has 8 from offset 8 (region size 16)"
    )
    with pytest.raises(InvalidArgument, match="input 'IN' needs 17 bytes but region 'r'"):
        server.read("r", 0, 17, tensor="IN")
    with pytest.raises(InvalidArgument, match="region 'r' has 0 from offset 20"):
        server.read("r", 20, 1)
    with pytest.raises(InvalidArgument, match="must be >= 0"):
        server.read("r", -1, 4)


def test_register_checks_the_range_fits_the_object(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    with pytest.raises(InvalidArgument, match=f"past the end of key '{key}'"):
        server.register("big", key, 32, REGION_BYTES)
    with pytest.raises(InvalidArgument, match="byte_size > 0"):
        server.register("empty", key, 0, 0)
    assert server.status() == []


def test_duplicate_name_is_already_exists(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    server.register("dup", key, 0, 8)
    with pytest.raises(AlreadyExists, match="'dup' is already registered"):
        server.register("dup", key, 8, 8)
    server.register("other", key, 8, 8)  # a second region over the same key is fine


def test_unknown_key_is_not_found(server: SystemSharedMemory) -> None:
    with pytest.raises(NotFound, match="no shared memory object with key '/meshserve_missing'"):
        server.register("r", "/meshserve_missing", 0, 8)


@pytest.mark.parametrize("bad_key", ["", "/", "../etc/passwd", "/a/b", ".."])
def test_keys_that_are_not_shm_names_are_refused(server: SystemSharedMemory, bad_key: str) -> None:
    with pytest.raises(InvalidArgument, match="not a POSIX shared memory name"):
        server.register("r", bad_key, 0, 8)


def test_unknown_region_is_not_found_on_use(server: SystemSharedMemory) -> None:
    with pytest.raises(NotFound, match="input 'IN' names shared memory region 'nope'"):
        server.read("nope", 0, 4, tensor="IN")
    with pytest.raises(NotFound, match="region 'nope'"):
        server.write("nope", 0, b"x")


def test_status_lists_regions_and_names_unknown_ones(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    server.register("b", key, 8, 8)
    server.register("a", key, 0, 8)
    assert server.status() == [RegionInfo("a", key, 0, 8), RegionInfo("b", key, 8, 8)]
    assert server.status("") == server.status(None)
    assert server.status("b") == [RegionInfo("b", key, 8, 8)]
    with pytest.raises(NotFound, match="Unable to find system shared memory region: 'c'"):
        server.status("c")


def test_unregister_one_all_and_unknown(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    for name in ("a", "b", "c"):
        server.register(name, key, 0, 8)
    server.unregister("b")
    assert [r.name for r in server.status()] == ["a", "c"]
    server.unregister("never-registered")  # Triton answers OK
    server.unregister("")
    assert server.status() == []
    server.register("a", key, 0, 8)  # the name is free again


def test_unregister_with_live_views_does_not_crash(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    client_shm.set_shared_memory_region(client_region, [np.arange(4, dtype=np.int64)])
    server.register("live", key, 0, 32)
    tensor = np.frombuffer(server.read("live", 0, 32), dtype=np.int64)

    server.unregister("live")

    assert server.status() == []
    with pytest.raises(NotFound):
        server.read("live", 0, 8)
    np.testing.assert_array_equal(tensor, np.arange(4))  # the mapping outlives the region
    del tensor
    gc.collect()


def test_close_with_live_views_does_not_crash(
    key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    shm = SystemSharedMemory()
    shm.register("r", key, 0, 8)
    view = shm.read("r", 0, 8)
    shm.close()
    assert len(view) == 8
    view.release()


def test_object_arrays_must_be_serialized_first(
    server: SystemSharedMemory, key: str, client_region: client_shm.SharedMemoryRegion
) -> None:
    server.register("r", key, 0, 8)
    with pytest.raises(InvalidArgument, match="output 'TEXT' must be serialized"):
        server.write("r", 0, np.array([b"ab"], dtype=object), tensor="TEXT")


def test_cuda_register_is_unsupported_without_gpu() -> None:
    cuda = CudaSharedMemory(gpu_available=lambda: False)
    with pytest.raises(Unsupported) as raised:
        cuda.register("c", b"\x00" * 64, 0, 1024)
    assert raised.value.message == "CUDA shared memory needs a GPU; this server found none"
    assert cuda.status() == []
    cuda.unregister(None)
    cuda.unregister("c")
    with pytest.raises(NotFound, match="cuda shared memory region: 'c'"):
        cuda.status("c")


def test_cuda_register_is_unsupported_with_gpu_too() -> None:
    cuda = CudaSharedMemory(gpu_available=lambda: True)
    with pytest.raises(Unsupported, match="use system shared memory instead"):
        cuda.register("c", b"\x00" * 64, 0, 1024)


def test_cuda_default_detection_answers_unsupported_on_this_host() -> None:
    cuda = CudaSharedMemory()
    with pytest.raises(Unsupported):
        cuda.register("c", b"", 0, 8)
