"""mesh_caller.for_loop: one caller per event loop, replaced (and the old one closed) when the
gateway address changes; mesh_caller.submit: calls from other threads run on the service's loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from protos.gen.inference import grpc_service_pb2 as pb
from services.core import mesh_caller
from services.core.mesh_caller import MeshCaller


def test_one_caller_per_loop_and_a_replaced_one_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(mesh_caller.XDS_ENV, raising=False)
    closed: list[MeshCaller] = []

    async def close(self: MeshCaller) -> None:
        closed.append(self)

    monkeypatch.setattr(MeshCaller, "close", close)

    async def main() -> tuple[MeshCaller, MeshCaller, MeshCaller]:
        first = mesh_caller.for_loop("127.0.0.1:1", "test")
        again = mesh_caller.for_loop("127.0.0.1:1", "test")
        moved = mesh_caller.for_loop("127.0.0.1:2", "test")
        await asyncio.sleep(0)  # the old caller's close runs as a task of this loop
        return first, again, moved

    first, again, moved = asyncio.run(main())
    assert again is first and moved is not first
    assert closed == [first]
    other_loop = asyncio.run(main())[0]
    assert other_loop is not first  # another loop has its own


def test_submit_runs_the_call_on_the_home_loop_and_cancels_it_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(mesh_caller.XDS_ENV, raising=False)
    seen: list[asyncio.AbstractEventLoop] = []
    cancelled = threading.Event()

    async def model_infer(
        self: MeshCaller, request: pb.ModelInferRequest, *args: object, **kwargs: object
    ) -> pb.ModelInferResponse:
        seen.append(asyncio.get_running_loop())
        if request.model_name == "forever":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return pb.ModelInferResponse(model_name=request.model_name)

    monkeypatch.setattr(MeshCaller, "model_infer", model_infer)
    assert mesh_caller.submit("gw:1", "t", pb.ModelInferRequest(), [], None) is None  # no loop

    home = asyncio.new_event_loop()
    thread = threading.Thread(target=home.run_forever, daemon=True)
    thread.start()
    mesh_caller.set_home_loop(home)
    try:
        future = mesh_caller.submit("gw:1", "t", pb.ModelInferRequest(model_name="m"), [], 5.0)
        assert future is not None and future.result(5).model_name == "m"
        assert seen == [home]

        async def on_the_home_loop() -> object:
            return mesh_caller.submit("gw:1", "t", pb.ModelInferRequest(), [], None)

        # on the home loop's own thread a blocking wait would never end: no future there
        assert asyncio.run_coroutine_threadsafe(on_the_home_loop(), home).result(5) is None

        stuck = mesh_caller.submit("gw:1", "t", pb.ModelInferRequest(model_name="forever"), [], 1)
        assert stuck is not None
        while len(seen) < 2:
            time.sleep(0.01)
        stuck.cancel()
        assert cancelled.wait(5)  # the waiting thread gave up: the call on the loop stopped too
    finally:
        mesh_caller.clear_home_loop(home)
        home.call_soon_threadsafe(home.stop)
        thread.join(5)
        home.close()
    assert mesh_caller.submit("gw:1", "t", pb.ModelInferRequest(), [], None) is None
