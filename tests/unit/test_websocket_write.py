"""Frames written straight to the transport: a client that does not take them is noticed."""

from __future__ import annotations

import asyncio
import socket as pysocket
from types import SimpleNamespace
from typing import Any

import pytest

from service.web.websocket import Closing, _close, _write


class Transport:
    def __init__(self, unsent: int) -> None:
        self.written, self.unsent = bytearray(), unsent

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return False


def socket(unsent: int, closed: bool = False) -> tuple[Any, Any, Transport]:
    """A request and websocket whose transport keeps `unsent` bytes and never drains."""
    transport = Transport(unsent)
    never_drains = SimpleNamespace(drain=asyncio.Event().wait)
    request = SimpleNamespace(transport=transport, writer=never_drains)
    return request, SimpleNamespace(closed=closed), transport


async def test_frames_the_kernel_took_are_written_without_waiting() -> None:
    request, ws, transport = socket(unsent=0)

    assert await _write(request, ws, b"frames", seconds=1.0)
    assert transport.written == b"frames"


async def test_a_client_that_does_not_take_its_frames_is_given_up_on() -> None:
    request, ws, transport = socket(unsent=1 << 20)

    async with asyncio.timeout(5):
        assert not await _write(request, ws, b"frames", seconds=0.05)
    assert transport.written == b"frames"


async def test_nothing_is_written_to_a_closing_socket() -> None:
    request, ws, transport = socket(unsent=0, closed=True)

    with pytest.raises(ConnectionResetError):
        await _write(request, ws, b"frames", seconds=1.0)
    assert transport.written == b""


async def test_a_close_that_times_out_as_the_peer_goes_resets_without_an_error() -> None:
    # The peer closed just as the wait ran out, and took the socket with it.
    gone = pysocket.socket()
    gone.close()
    aborted: list[bool] = []
    transport = SimpleNamespace(
        get_extra_info=lambda name: gone if name == "socket" else None,
        abort=lambda: aborted.append(True),
    )
    ws = SimpleNamespace(close=lambda **_: asyncio.Event().wait())  # never answered

    await _close(ws, Closing(1000, "batch completed"), 0.01, transport)  # type: ignore[arg-type]

    assert aborted == [True]
