"""The protobuf descriptor set Envoy needs to read model names out of gRPC request bodies.

Data flow: ``control_plane.translate`` embeds these bytes inline in the gRPC listener's
``envoy.filters.http.grpc_field_extraction`` filter, which parses each model-scoped request
(ModelInfer, ModelReady, ...) with them to extract fields 1 and 2 (model name and version) into
dynamic metadata. Built from the generated modules (no protoc at run time), dependencies first,
as ``protoc --include_imports --descriptor_set_out`` would write it.
"""

from __future__ import annotations

from functools import cache

from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pb2

from protos.gen.inference import grpc_service_pb2


def _dependencies_first(root: _descriptor.FileDescriptor) -> list[_descriptor.FileDescriptor]:
    """``root`` and everything it imports, each file after the files it depends on."""
    ordered: list[_descriptor.FileDescriptor] = []
    seen: set[str] = set()

    def visit(fd: _descriptor.FileDescriptor) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            visit(dep)
        ordered.append(fd)

    visit(root)
    return ordered


@cache
def descriptor_set_bytes() -> bytes:
    """Serialized ``FileDescriptorSet`` of ``grpc_service.proto`` and its imports (cached)."""
    fds = descriptor_pb2.FileDescriptorSet()
    for fd in _dependencies_first(grpc_service_pb2.DESCRIPTOR):
        fd.CopyToProto(fds.file.add())
    return fds.SerializeToString(deterministic=True)
