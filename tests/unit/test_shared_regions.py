"""The control plane's book of shared-memory regions registered through the gateway: what it
records from gRPC and REST calls, and what it says a joining instance still lacks."""

from __future__ import annotations

import json

from control_plane.model import ServiceInstance
from control_plane.shared_regions import RegionBook
from protos.gen.inference import grpc_service_pb2 as pb


def _instance(name: str) -> ServiceInstance:
    return ServiceInstance(id=name, family="onnx", host="127.0.0.1", grpc_port=1, http_port=2)


A, B, C = _instance("a"), _instance("b"), _instance("c")


def _missing(book: RegionBook, *instances: ServiceInstance) -> set[tuple[str, str]]:
    return {(i.id, r.name) for i, r in book.missing(instances)}


def test_a_joining_instance_lacks_every_region_the_others_got() -> None:
    book = RegionBook()
    book.registered(pb.SystemSharedMemoryRegisterRequest(name="r1", key="/k", byte_size=8), [A])
    book.registered(pb.SystemSharedMemoryRegisterRequest(name="r2", key="/k", byte_size=8), [A])
    assert _missing(book, A) == set()
    assert _missing(book, A, B) == {("b", "r1"), ("b", "r2")}
    book.made(B, "r1")
    assert _missing(book, A, B) == {("b", "r2")}
    [(instance, request)] = book.missing([A, B])
    assert (instance.id, request.key, request.byte_size) == ("b", "/k", 8)


def test_unregistering_forgets_the_region_and_a_departed_instance_is_forgotten() -> None:
    book = RegionBook()
    for name in ("r1", "r2"):
        book.registered(pb.SystemSharedMemoryRegisterRequest(name=name, key="/k"), [A, B])
    book.unregistered("r1")
    assert book.names() == ["r2"]
    book.made(C, "r1")  # unregistered meanwhile: not booked
    assert _missing(book, A, B, C) == {("c", "r2")}
    book.missing([A])  # b left ...
    assert _missing(book, A, B) == {("b", "r2")}  # ... and comes back as a stranger
    book.unregistered("")
    assert book.names() == [] and _missing(book, A, B, C) == set()


def test_rest_calls_are_booked_like_grpc_ones() -> None:
    book = RegionBook()
    body = json.dumps({"key": "/shm", "offset": 16, "byte_size": 64}).encode()
    path = "/v2/systemsharedmemory/region/img/register"
    book.rest_call("POST", path, body, 400, [A])  # refused by a service: not booked
    assert book.names() == []
    book.rest_call("POST", path, body, 200, [A])
    [(instance, request)] = book.missing([A, B])
    assert instance.id == "b"
    assert (request.name, request.key, request.offset, request.byte_size) == ("img", "/shm", 16, 64)
    book.rest_call("GET", "/v2/systemsharedmemory/region/img/status", b"", 200, [A])
    assert book.names() == ["img"]
    book.rest_call("POST", "/v2/systemsharedmemory/region/img/unregister", b"", 200, [A])
    assert book.names() == []
    book.rest_call("POST", path, body, 200, [A])
    book.rest_call("POST", "/v2/systemsharedmemory/unregister", b"", 500, [A])
    assert book.names() == []
