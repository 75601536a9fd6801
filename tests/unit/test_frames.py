"""Feed frames are written to sockets as they are, so they must be what aiohttp would send."""

from __future__ import annotations

import pytest
from aiohttp import WSMsgType
from aiohttp.http import WebSocketWriter

from service.web.feeds import text_frame


class Transport:
    """Collects what aiohttp's websocket writer writes."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False


class Protocol:
    _paused = False


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
async def test_a_frame_is_what_aiohttp_sends_for_the_same_text(size: int) -> None:
    transport, payload = Transport(), b"x" * size
    writer = WebSocketWriter(Protocol(), transport)  # type: ignore[arg-type]  # stand-ins

    await writer.send_frame(payload, WSMsgType.TEXT)

    assert text_frame(payload) == bytes(transport.written)
