"""Errors of the serving kit, each carrying its gRPC status and HTTP code.

Every layer raises these; the transports (grpc_servicer, http_app) translate them in one place.
An exception that is not a ServingError reaches the client as a generic INTERNAL error and its
traceback goes to the log.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

#: the most bytes a status message may take in gRPC trailers (``grpc-message``, percent-encoded):
#: clients refuse trailers over 8 KiB (gRPC's default soft limit) and Envoy resets a stream
#: whose headers pass 60 KiB, so a message that echoes a huge request field (a model name of
#: megabytes) is cut to this
MAX_STATUS_BYTES = 6000


def _encoded_size(char: str) -> int:
    """Bytes ``char`` takes in ``grpc-message`` (printable ASCII but ``%`` as is, the rest
    percent-encoded byte by byte)."""
    if " " <= char <= "~" and char != "%":
        return 1
    return 3 * len(char.encode("utf-8", "replace"))


def status_details(message: str) -> str:
    """``message`` as a gRPC status carries it: cut, saying how long it was, where it would
    take more than MAX_STATUS_BYTES in the trailers."""
    if len(message) * 12 <= MAX_STATUS_BYTES:  # 12: the most one character can take
        return message
    note = f"... (message cut: {len(message)} characters)"
    room = MAX_STATUS_BYTES - len(note)
    size, cut = 0, None
    for end, char in enumerate(message):
        size += _encoded_size(char)
        if cut is None and size > room:
            cut = end
        if size > MAX_STATUS_BYTES:
            return message[:cut] + note
    return message


class ServingError(Exception):
    """Base class: a message for the user plus the status it maps to."""

    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    #: label used for nv_inference_request_failure{reason=...}
    reason: ClassVar[str] = "OTHER"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    """The caller sent something malformed or inconsistent with the model's config."""

    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    reason = "REJECTED"


class NotFound(ServingError):
    """Unknown model, version, output or shared-memory region."""

    grpc_status = grpc.StatusCode.NOT_FOUND
    http_status = 404
    reason = "REJECTED"


class UnknownModel(NotFound):
    """A model this service does not have at all (not one of its versions): another service of
    the mesh may serve it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown model '{name}'")
        self.model = name


class AlreadyExists(ServingError):
    """A shared-memory region registered twice under one name."""

    grpc_status = grpc.StatusCode.ALREADY_EXISTS
    http_status = 400
    reason = "REJECTED"


class Unavailable(ServingError):
    """Model not ready, failed to load, being unloaded, or the server is draining."""

    grpc_status = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    reason = "REJECTED"


class QueueFull(ServingError):
    """The model's queue is at max_queue_size."""

    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 503
    reason = "REJECTED"


class QueueTimeout(ServingError):
    """The request's timeout expired while it waited in the queue."""

    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    reason = "CANCELED"


class Unsupported(ServingError):
    """A feature this build or this machine does not offer (e.g. CUDA shared memory on CPU)."""

    grpc_status = grpc.StatusCode.UNIMPLEMENTED
    http_status = 501
    reason = "REJECTED"


class ModelLoadError(ServingError):
    """A model (config or file) that cannot be loaded; the rest of the repository keeps serving."""

    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    reason = "REJECTED"


class InternalError(ServingError):
    """A failure inside the server (runtime crash). The message shown to users stays generic."""

    grpc_status = grpc.StatusCode.INTERNAL
    http_status = 500
    reason = "BACKEND"


_BY_STATUS: dict[grpc.StatusCode, type[ServingError]] = {
    cls.grpc_status: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, Unavailable, QueueFull, QueueTimeout)
}
_BY_STATUS[grpc.StatusCode.UNIMPLEMENTED] = Unsupported


class Cancelled(ServingError):
    """The caller (or a step's caller) cancelled the request."""

    grpc_status = grpc.StatusCode.CANCELLED
    http_status = 499
    reason = "CANCELED"


_BY_STATUS[grpc.StatusCode.CANCELLED] = Cancelled


def error_for_status(status: grpc.StatusCode, message: str) -> ServingError:
    """The ServingError that answers with ``status`` (e.g. to pass on a downstream call's error).

    Statuses without a class of their own (INTERNAL, UNKNOWN, ...) become InternalError, whose
    message still reaches the client unchanged.
    """
    return _BY_STATUS.get(status, InternalError)(message)
