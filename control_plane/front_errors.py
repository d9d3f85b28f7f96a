"""The control plane front's one error type, and how fan-out answers become results or errors.

``FrontError`` carries a gRPC status and a message for the user (front_http maps the status to
its HTTP code; front.py aborts the call with it). When the front asks several services
(front_core.Front.gather), each answer is a message or a FrontError: ``answered`` keeps the
messages and logs the rest, ``all_or_raise`` needs every one, naming the service that failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from control_plane.model import ServiceInstance

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class FrontError(Exception):
    """The front's one error type: a gRPC status and a message for the user (front_http maps
    the status to its HTTP code)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def unknown_model(cls, name: str) -> FrontError:
        return cls(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")

    @classmethod
    def unknown_version(cls, name: str, version: str, known: Sequence[str]) -> FrontError:
        return cls(
            grpc.StatusCode.NOT_FOUND,
            f"unknown version {version} of model '{name}' (it has {', '.join(known)})",
        )

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError, inst: ServiceInstance) -> FrontError:
        """A service's answer keeps its status and message; a transport failure names the hop."""
        code, details = exc.code(), exc.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
            details = f"service '{inst.id}' ({inst.host}:{inst.grpc_port}): {details}"
        return cls(code, details)


def answered(answers: list[tuple[ServiceInstance, M | FrontError]], what: str) -> list[M]:
    """The answers of those that answered; the others are logged and skipped."""
    out: list[M] = []
    for inst, answer in answers:
        if isinstance(answer, FrontError):
            log.warning("%s: skipped %s", what, _naming(inst, answer.message))
        else:
            out.append(answer)
    return out


def _naming(inst: ServiceInstance, message: str) -> str:
    prefix = f"service '{inst.id}'"
    return message if message.startswith(prefix) else f"{prefix}: {message}"


def all_or_raise(answers: list[tuple[ServiceInstance, M | FrontError]]) -> list[M]:
    for inst, answer in answers:
        if isinstance(answer, FrontError):
            if len(answers) > 1:
                raise FrontError(answer.code, _naming(inst, answer.message))
            raise answer
    return [a for _, a in answers if not isinstance(a, FrontError)]
