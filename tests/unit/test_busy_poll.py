"""The busy-polling event loop (services/core/busy_poll.py) and its setting.

The selector tests count polls instead of timing them: whether the selector spun, stopped
spinning, or never started is what they check; time only bounds how long a test can take.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core import busy_poll
from services.core.busy_poll import BusyPollEventLoop, BusyPollSelector
from services.core.settings import DEFAULT_BUSY_POLL_US, ServerSettings, settings_from_args


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _selector(window_s: float, held: bool = False) -> BusyPollSelector:
    return BusyPollSelector(window_s, lambda: held)


def _send_later(sock: socket.socket, delay_s: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), sock.send(b"x")))
    thread.start()
    return thread


def test_polls_until_an_event_arrives_within_the_window(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sel = _selector(window_s=10.0)
    sel.register(a, selectors.EVENT_READ)
    sender = _send_later(b, 0.02)
    ready = sel.select(None)
    sender.join()
    assert [key.fileobj for key, _ in ready] == [a]
    assert sel.polls > 1  # it spun: a blocking select makes no polls
    sel.close()


def test_blocks_once_the_window_is_over(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sel = _selector(window_s=0.002)
    sel.register(a, selectors.EVENT_READ)
    sender = _send_later(b, 0.3)
    start = time.monotonic()
    ready = sel.select(None)
    sender.join()
    assert [key.fileobj for key, _ in ready] == [a]
    assert time.monotonic() - start >= 0.25
    # ~1 µs a poll: had it spun all the 0.3 s it would have made far more than this
    assert 0 < sel.polls < 100_000
    sel.close()


@pytest.mark.parametrize("window_s", [0.001, 5.0])
def test_keeps_the_timeout(pair: tuple[socket.socket, socket.socket], window_s: float) -> None:
    a, _ = pair
    sel = _selector(window_s)
    sel.register(a, selectors.EVENT_READ)
    start = time.monotonic()
    assert sel.select(0.03) == []
    elapsed = time.monotonic() - start
    assert 0.029 <= elapsed < 2.0
    assert sel.polls > 0
    sel.close()


def test_no_polling_when_held_off_or_asked_not_to_wait(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    for sel, timeout in (
        (_selector(5.0, held=True), 0.01),
        (_selector(5.0), 0),
        (_selector(0), 0.01),
    ):
        sel.register(a, selectors.EVENT_READ)
        assert sel.select(timeout) == []
        assert sel.polls == 0
        sel.close()
    b.send(b"x")
    sel = _selector(5.0, held=True)
    sel.register(a, selectors.EVENT_READ)
    assert [key.fileobj for key, _ in sel.select(None)] == [a]
    sel.close()


def test_the_loop_does_not_poll_while_its_executor_work_runs() -> None:
    loop = busy_poll.event_loop(200_000)
    assert isinstance(loop, BusyPollEventLoop)
    release = threading.Event()

    async def scenario() -> None:
        work = loop.run_in_executor(None, release.wait, 10.0)
        await asyncio.sleep(0)
        before = loop.busy_selector.polls
        await asyncio.sleep(0.05)  # idle, but a worker thread runs this loop's work
        assert loop.busy_selector.polls == before
        release.set()
        assert await work is True
        before = loop.busy_selector.polls
        await asyncio.sleep(0.01)  # idle with nothing in threads: it polls until the timer
        assert loop.busy_selector.polls > before

    try:
        loop.run_until_complete(scenario())
    finally:
        release.set()
        loop.close()


def test_a_zero_window_is_asyncios_own_loop_and_a_negative_one_an_error() -> None:
    loop = busy_poll.event_loop(0)
    try:
        assert not isinstance(loop, BusyPollEventLoop)
    finally:
        loop.close()
    with pytest.raises(ValueError, match="0 or more microseconds"):
        busy_poll.event_loop(-1)


def test_the_window_comes_from_the_flag_else_the_environment_else_the_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model-repository", "/tmp"]
    monkeypatch.delenv(busy_poll.ENV, raising=False)
    assert settings_from_args(args, "svc").busy_poll_us == DEFAULT_BUSY_POLL_US
    assert ServerSettings(model_repository=Path("/tmp")).busy_poll_us == DEFAULT_BUSY_POLL_US
    monkeypatch.setenv(busy_poll.ENV, "0")
    assert settings_from_args(args, "svc").busy_poll_us == 0
    assert settings_from_args([*args, "--busy-poll-us", "250"], "svc").busy_poll_us == 250
    monkeypatch.setenv(busy_poll.ENV, "fast")
    with pytest.raises(SystemExit):
        settings_from_args(args, "svc")
    assert "MESHSERVE_BUSY_POLL_US='fast'" in capsys.readouterr().err
    monkeypatch.delenv(busy_poll.ENV)
    with pytest.raises(SystemExit):
        settings_from_args([*args, "--busy-poll-us", "-5"], "svc")
    assert "--busy-poll-us must be 0" in capsys.readouterr().err


async def test_nothing_else_ready_tells_a_lone_callback_from_one_of_a_burst() -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0)
    assert busy_poll.nothing_else_ready(loop)
    handle = loop.call_soon(lambda: None)
    assert not busy_poll.nothing_else_ready(loop)
    handle.cancel()
    await asyncio.sleep(0)
    assert busy_poll.nothing_else_ready(loop)
