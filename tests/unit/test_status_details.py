"""Status messages cut to what gRPC trailers carry (services/core/errors.status_details): short
ones unchanged, long ones cut with their length said, the percent-encoded size (what counts
against the client's 8 KiB limit) never over MAX_STATUS_BYTES, whatever the characters."""

from __future__ import annotations

import urllib.parse

import pytest

from services.core.errors import MAX_STATUS_BYTES, status_details


def _grpc_message_bytes(text: str) -> int:
    """The size of ``grpc-message`` as gRPC percent-encodes it (printable ASCII but %)."""
    safe = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
    return len(urllib.parse.quote(text, safe=safe))


@pytest.mark.parametrize("message", ["unknown model 'simple'", "é" * 500, "x" * 5999])
def test_messages_that_fit_are_kept(message: str) -> None:
    assert status_details(message) == message


@pytest.mark.parametrize("char", ["n", "%", "é", "模", "😀", "\n"])
def test_long_messages_are_cut_under_the_limit_saying_how_long_they_were(char: str) -> None:
    message = f"unknown model '{char * 100_000}'"
    cut = status_details(message)
    assert cut.startswith(f"unknown model '{char}")
    assert cut.endswith(f"... (message cut: {len(message)} characters)")
    assert MAX_STATUS_BYTES - 12 < _grpc_message_bytes(cut) <= MAX_STATUS_BYTES
