"""The runtime contract: what a framework service implements (load / infer / unload).

A framework service (services/<fw>/) subclasses Runtime; everything else (repository, config,
batching, transports, statistics) is the shared kit. One Runtime object is one execution instance
(Triton's model instance): ``instance_group { count: N }`` creates N of them, and the scheduler
runs at most one batch at a time on each, from a worker thread, so ``infer`` may block and should
release the GIL in native code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from protos.gen.inference import model_config_pb2 as mc
from services.core.errors import ServingError
from services.core.requests import Array, InferRequest


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """Where one instance runs: its group's kind (CPU/GPU) and device, its ordinal, its group."""

    name: str
    kind: int  # mc.ModelInstanceGroup.Kind value
    device_id: int = -1
    index: int = 0
    #: the config's instance_group it was expanded from (-1: a config without groups)
    group: int = -1


class Runtime(ABC):
    """One loaded copy of one model version."""

    #: Triton backend name this runtime serves ("onnxruntime")
    backend: ClassVar[str]
    #: Triton platform names that select this runtime ("onnxruntime_onnx")
    platforms: ClassVar[tuple[str, ...]] = ()
    #: file looked for in the version directory when config.default_model_filename is empty
    default_model_filename: ClassVar[str]
    #: ``autocomplete`` only derives what Triton always derives (an ensemble's decoupled policy
    #: from its steps), so it runs even with --disable-auto-complete-config
    autocomplete_always: ClassVar[bool] = False

    @classmethod  # noqa: B027 - optional hook, empty by default
    def autocomplete(cls, config: mc.ModelConfig, model_path: Path) -> None:
        """Fill what the config leaves out (inputs, outputs, max_batch_size) from the model file.

        Called before validation; must not override what the user wrote. Default: nothing.
        """

    @abstractmethod
    def __init__(self, config: mc.ModelConfig, model_path: Path, instance: InstanceSpec) -> None:
        """Load the model; raise (any exception) if the file is not a valid model."""

    @abstractmethod
    def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        """Run one batch. Inputs carry the batch dimension when max_batch_size > 0.

        Must return every name in ``outputs`` with the batch dimension first.
        """

    #: True: the scheduler calls ``infer_requests`` with the batch's requests kept apart,
    #: instead of ``infer`` with their inputs concatenated (Triton's Python backend needs this)
    takes_request_list: ClassVar[bool] = False

    def infer_requests(
        self, requests: Sequence[InferRequest], outputs: Sequence[str]
    ) -> list[dict[str, Array] | ServingError]:
        """Run one batch given as its requests; one result per request, in order.

        A ServingError in a request's place fails only that request. Called instead of
        ``infer`` when ``takes_request_list`` is True.
        """
        raise NotImplementedError(f"{type(self).__name__} does not take request lists")

    #: True: a stateful model's control inputs and implicit state (sequence_batching) are
    #: loaded as inputs and outputs of the config this runtime gets (sequences.runtime_config);
    #: False: the runtime gets the user's config and finds them only in each request's inputs
    declares_sequence_io: ClassVar[bool] = True

    #: False: batches never run on the event loop's thread however quick they are (a runtime
    #: whose code may wait on this service, or run an event loop of its own, sets it)
    runs_inline: bool = True

    #: True: requests bypass the batcher and each runs as ``infer_async`` on the event loop,
    #: as many at once as arrive (an ensemble, whose work is waiting on other services)
    async_execution: ClassVar[bool] = False

    async def infer_async(self, request: InferRequest, outputs: Sequence[str]) -> dict[str, Array]:
        """Run one request on the event loop; must not block. Called when ``async_execution``.

        Returns every name in ``outputs``; cancelling the coroutine must cancel the work.
        """
        raise NotImplementedError(f"{type(self).__name__} has no asynchronous execution")

    def unload(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Called once, after the last infer returns."""
