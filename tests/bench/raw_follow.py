"""Websocket followers for the fan-out scenario that note when bytes arrive and decode later.

aiohttp's client parses and JSON-decodes each message as it arrives: 500 followers in one
process then spend seconds of CPU on half a million messages, and the lag measured is the
client's own. These only note when each chunk of bytes arrives. Frame headers are walked
once a connection has been quiet for a moment (or has waited long enough), to answer pings
and see the close; a frame was received when the chunk holding its last byte arrived. The
JSON waits for the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from yarl import URL

ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, 1.3
FIN, MASKED = 0x80, 0x80
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA
FINISHED = 1000  # the service's close code after the `finished` message
RESYNC = 4000  # the service's close code for "reconnect with ?after="
NO_STATUS = 1005  # RFC 6455, 7.4.1: a close frame without a code
QUIET = 0.1  # seconds without bytes after which a connection walks what it got
MOST_UNWALKED = 2.0  # seconds a connection's bytes wait for their walk at most


def accept_for(key: bytes) -> str:
    """The Sec-WebSocket-Accept a server answers to a Sec-WebSocket-Key (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + ACCEPT_GUID).digest()).decode()


def client_frame(opcode: int, payload: bytes | bytearray) -> bytes:
    """A control frame as a client must send it: masked (RFC 6455, 5.3)."""
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((FIN | opcode, MASKED | len(payload))) + key + body


class Connection(asyncio.Protocol):
    """One websocket connection: the upgrade, then every frame noted as it completes."""

    def __init__(self, host: str, target: str, connected: asyncio.Event) -> None:
        key = base64.b64encode(os.urandom(16))
        self.request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.accept = accept_for(key)
        self.connected = connected  # set on the first 101 answer
        self.upgraded = False
        self.data = bytearray()  # what was received after the 101 answer, up to the last walk
        self.unwalked: list[bytes] = []  # chunks received since, joined to `data` by a walk
        self.size = 0  # bytes received after the 101 answer
        self.next = 0  # where the next frame starts in `data`
        self.arrivals: list[tuple[int, float]] = []  # (size after it, time) of chunks
        self.texts: list[tuple[float, int, int]] = []  # (receipt, start, end) of each payload
        self.close_code: int | None = None
        self.ended = asyncio.Event()
        self._last_at = 0.0  # when the last chunk arrived
        self._walking: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self._last_at = at = time.time()
        self.feed(data, at)
        if self._walking is None and self.upgraded:
            loop = asyncio.get_running_loop()
            self._walking = loop.call_later(QUIET, self._walk_when_quiet, at)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._walking is not None:
            self._walking.cancel()
        if self.upgraded:
            self.walk()
        self.ended.set()

    def feed(self, data: bytes, at: float) -> None:
        """Take bytes that reached the client at `at`: the frames they complete arrived then."""
        if self.upgraded:
            self.unwalked.append(data)
            self.size += len(data)
            self.arrivals.append((self.size, at))
            return
        self.data += data
        if self._upgrade():
            self.size = len(self.data)
            self.arrivals.append((self.size, at))

    def _walk_when_quiet(self, first_at: float) -> None:
        now = time.time()
        if now - self._last_at < QUIET and now - first_at < MOST_UNWALKED:
            loop = asyncio.get_running_loop()
            self._walking = loop.call_later(QUIET, self._walk_when_quiet, first_at)
            return
        self._walking = None
        self.walk()

    def message(self, index: int) -> tuple[float, Any]:
        """A text message, decoded, with the time its last byte arrived."""
        at, start, end = self.texts[index]
        return at, orjson.loads(memoryview(self.data)[start:end])

    def _upgrade(self) -> bool:
        """Whether the 101 answer is in and right; a wrong one ends the connection."""
        head_end = self.data.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        status, *lines = self.data[:head_end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        if status.split(" ")[1:2] != ["101"] or headers.get("sec-websocket-accept") != self.accept:
            self.transport.close()
            return False
        del self.data[: head_end + 4]
        self.upgraded = True
        self.connected.set()
        return True

    def walk(self) -> None:
        """Note each frame completed since the last walk, with the arrival of the chunk
        holding its last byte; answer pings, and the close."""
        self.data += b"".join(self.unwalked)
        self.unwalked.clear()
        data, start, arrivals, chunk = self.data, self.next, self.arrivals, 0
        while self.close_code is None and len(data) - start >= 2:
            first, size = data[start], data[start + 1]
            if first & 0xF0 != FIN or size & MASKED:
                # The service neither fragments, compresses (not offered) nor masks frames.
                raise ValueError(f"unexpected frame header {first:#x} {size:#x}")
            header = 2
            if size >= 126:
                header = 4 if size == 126 else 10
                if len(data) - start < header:
                    break
                size = int.from_bytes(data[start + 2 : start + header], "big")
            end = start + header + size
            if len(data) < end:
                break
            while arrivals[chunk][0] < end:
                chunk += 1
            opcode = first & 0x0F
            if opcode == TEXT:
                self.texts.append((arrivals[chunk][1], start + header, end))
            elif opcode == PING:
                self.transport.write(client_frame(PONG, data[start + header : end]))
            elif opcode == CLOSE:
                code = data[start + header : start + header + 2]
                self.close_code = int.from_bytes(code, "big") if code else NO_STATUS
                self.transport.write(client_frame(CLOSE, code))
                self.transport.close()
            start = end
        self.next = start
        while chunk < len(arrivals) and arrivals[chunk][0] <= start:  # wholly walked
            chunk += 1
        del arrivals[:chunk]


@dataclass(frozen=True)
class Delivered:
    """What one client received, in order: each event's version and receipt time."""

    versions: list[int]
    received: list[float]  # wall clock when the last byte of each event's frame arrived
    finished: bool  # the last message was `finished`

    def in_order(self, last_version: int) -> bool:
        """Every version from 0 to `last_version` exactly once, in order, then `finished`."""
        return self.finished and self.versions == list(range(last_version + 1))


@dataclass
class Follower:
    """One client following a batch's websocket from its first event to `finished`."""

    connections: list[Connection] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)  # upgraded once
    last: int = -1  # the last version received, as of the last connection's end
    resyncs: int = 0  # closed with 4000: fell behind, reconnected with ?after
    drops: int = 0  # connection lost or refused otherwise, reconnected with ?after

    async def follow(self, url: str, batch_id: str) -> None:
        """Follow as a client should: after a resync request or a lost connection, reconnect
        with ?after=<last version received>."""
        host, port = URL(url).host, URL(url).port
        assert host is not None and port is not None, f"not a service URL: {url}"
        loop = asyncio.get_running_loop()
        while True:
            target = f"/batch/{batch_id}/ws?after={self.last}"
            new = functools.partial(Connection, f"{host}:{port}", target, self.connected)
            try:
                transport, connection = await loop.create_connection(new, host, port)
            except OSError:
                self.drops += 1
                await asyncio.sleep(0.5)
                continue
            self.connections.append(connection)
            with contextlib.closing(transport):  # also when the run is cut off
                await connection.ended.wait()
            if connection.close_code == FINISHED:
                # Sent only after `finished`; decoding that (every row) 500 times here would
                # hold up the other clients' reads. delivered() checks it was there.
                return
            if connection.texts:
                body = connection.message(-1)[1]
                if body["type"] == "finished":
                    return
                self.last = body["version"]
            if connection.close_code == RESYNC:
                self.resyncs += 1
            else:
                self.drops += 1
                if not connection.upgraded:
                    await asyncio.sleep(0.5)

    def delivered(self) -> Delivered:
        """Decode every message received, after the run."""
        versions: list[int] = []
        received: list[float] = []
        finished = False
        for connection in self.connections:
            for index in range(len(connection.texts)):
                at, body = connection.message(index)
                if body["type"] == "event":
                    versions.append(body["version"])
                    received.append(at)
                finished = body["type"] == "finished"
        return Delivered(versions, received, finished)
