"""mesh_caller.for_loop: one caller per event loop, replaced (and the old one closed) when the
gateway address changes."""

from __future__ import annotations

import asyncio

import pytest

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
