"""The fan-out benchmark's raw follower: the upgrade, frames split anywhere, pings, the close."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.bench import raw_follow
from tests.bench.raw_follow import Connection, Follower, accept_for


class Transport:
    def __init__(self) -> None:
        self.written, self.closed = bytearray(), False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked frame, with a 7-, 16- or 64-bit length as the service would send it."""
    if len(payload) < 126:
        header = bytes((0x80 | opcode, len(payload)))
    elif len(payload) < 1 << 16:
        header = bytes((0x80 | opcode, 126)) + len(payload).to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + len(payload).to_bytes(8, "big")
    return header + payload


def text(body: dict[str, object]) -> bytes:
    return server_frame(0x1, json.dumps(body).encode())


def unmask(frame: bytes) -> tuple[int, bytes]:
    """The opcode and payload of a client's frame, which must be masked and short."""
    assert frame[0] & 0x80, "not final"
    assert frame[1] & 0x80, "not masked"
    size, key = frame[1] & 0x7F, frame[2:6]
    assert len(frame) == 6 + size
    return frame[0] & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(frame[6:]))


def opened(transport: Transport, target: str = "/batch/b/ws?after=-1") -> Connection:
    """A connection whose request went out."""
    connection = Connection("127.0.0.1:80", target, asyncio.Event())
    connection.connection_made(transport)  # type: ignore[arg-type]  # a stand-in
    return connection


def upgraded(transport: Transport, answer: str = "") -> Connection:
    """A connection whose request went out and whose 101 answer came back."""
    connection = opened(transport)
    key = next(
        line.split(": ")[1]
        for line in transport.written.decode().split("\r\n")
        if line.startswith("Sec-WebSocket-Key")
    )
    accept = answer or accept_for(key.encode())
    transport.written.clear()
    head = (
        f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}"
    )
    connection.feed(f"{head}\r\n\r\n".encode(), at=0.0)
    return connection


def test_the_request_asks_for_an_upgrade() -> None:
    transport = Transport()
    opened(transport, "/batch/b/ws?after=7")

    request = transport.written.decode()
    assert request.startswith("GET /batch/b/ws?after=7 HTTP/1.1\r\n")
    assert "\r\nUpgrade: websocket\r\n" in request
    assert "\r\nSec-WebSocket-Version: 13\r\n" in request
    assert request.endswith("\r\n\r\n")


def test_the_accept_of_the_rfc_example() -> None:
    assert accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_101_with_the_right_accept_connects() -> None:
    connection = upgraded(Transport())

    assert connection.upgraded
    assert connection.connected.is_set()


def test_a_wrong_accept_ends_the_connection() -> None:
    transport = Transport()
    connection = upgraded(transport, answer="d3Jvbmc=")

    assert not connection.upgraded
    assert not connection.connected.is_set()
    assert transport.closed


def test_a_refusal_ends_the_connection() -> None:
    transport = Transport()
    connection = opened(transport)
    connection.feed(b'HTTP/1.1 422 Unprocessable Entity\r\n\r\n{"detail": "after"}', at=0.0)

    assert not connection.upgraded
    assert transport.closed


def test_frames_in_the_answer_and_split_anywhere_are_noted_when_their_last_byte_arrives() -> None:
    connection = upgraded(Transport())
    first, second = text({"type": "event", "version": 0}), text({"type": "event", "version": 1})
    stream = first + second

    connection.feed(stream[:1], at=1.0)  # half a header
    connection.feed(stream[1:10], at=2.0)
    connection.feed(stream[10 : len(first) + 3], at=3.0)  # completes the first
    connection.feed(stream[len(first) + 3 :], at=4.0)
    connection.walk()  # once, after every chunk: each frame still gets its own chunk's time

    assert [connection.message(i) for i in range(2)] == [
        (3.0, {"type": "event", "version": 0}),
        (4.0, {"type": "event", "version": 1}),
    ]


@pytest.mark.parametrize("size", [125, 126, 300, 65_535, 65_536, 70_000])
def test_lengths_of_7_16_and_64_bits(size: int) -> None:
    connection = upgraded(Transport())
    padding = "x" * (size - len('{"type":"event","version":5,"pad":""}'))
    body = f'{{"type":"event","version":5,"pad":"{padding}"}}'.encode()
    assert len(body) == size
    frame = server_frame(0x1, body) + text({"type": "finished", "version": 5})

    for offset in range(0, len(frame), 3):  # the extended length arrives in pieces too
        connection.feed(frame[offset : offset + 3], at=float(offset))
        connection.walk()

    assert connection.message(0)[1]["pad"] == padding
    assert connection.message(1)[1] == {"type": "finished", "version": 5}
    assert len(connection.texts) == 2


def test_a_ping_is_answered_with_a_masked_pong_of_its_payload() -> None:
    transport = Transport()
    connection = upgraded(transport)

    connection.feed(server_frame(0x9, b"are you there") + text({"type": "event"}), at=1.0)
    connection.walk()

    assert unmask(bytes(transport.written)) == (0xA, b"are you there")
    assert len(connection.texts) == 1


def test_a_close_frame_gives_its_code_and_is_answered() -> None:
    transport = Transport()
    connection = upgraded(transport)

    connection.feed(server_frame(0x8, (4000).to_bytes(2, "big") + b"fell behind"), at=1.0)
    connection.walk()
    connection.feed(text({"type": "event"}), at=2.0)  # nothing counts after the close
    connection.walk()

    assert connection.close_code == 4000
    assert unmask(bytes(transport.written)) == (0x8, (4000).to_bytes(2, "big"))
    assert transport.closed
    assert connection.texts == []


def test_a_close_frame_without_a_code() -> None:
    connection = upgraded(Transport())

    connection.feed(server_frame(0x8, b""), at=1.0)
    connection.walk()

    assert connection.close_code == 1005


@pytest.mark.parametrize(
    "header",
    [b"\x01\x02", b"\xc1\x02", b"\x81\x82"],
    ids=["fragmented", "compressed", "masked"],
)
def test_frames_the_service_never_sends_are_refused(header: bytes) -> None:
    connection = upgraded(Transport())

    connection.feed(header + b"{}", at=1.0)
    with pytest.raises(ValueError, match="unexpected frame"):
        connection.walk()


def test_delivered_runs_through_every_connection_in_order() -> None:
    follower = Follower()
    resynced, last = upgraded(Transport()), upgraded(Transport())
    resynced.feed(text({"type": "event", "version": 0}) + text({"type": "event", "version": 1}), 1)
    resynced.feed(server_frame(0x8, (4000).to_bytes(2, "big")), at=2.0)
    last.feed(text({"type": "event", "version": 2}), at=3.0)
    last.feed(text({"type": "finished", "version": 2}), at=4.0)
    resynced.walk()
    last.walk()
    follower.connections += [resynced, last]

    delivered = follower.delivered()

    assert delivered.versions == [0, 1, 2]
    assert delivered.received == [1.0, 1.0, 3.0]
    assert delivered.in_order(2)
    assert not delivered.in_order(3)


def test_not_in_order_without_finished_or_with_a_repeat() -> None:
    follower = Follower()
    connection = upgraded(Transport())
    connection.feed(text({"type": "event", "version": 0}) * 2, at=1.0)
    connection.walk()
    follower.connections.append(connection)

    assert not follower.delivered().in_order(0)  # no `finished`
    connection.feed(text({"type": "finished", "version": 0}), at=2.0)
    connection.walk()
    assert follower.delivered().finished
    assert not follower.delivered().in_order(0)  # version 0 twice


@pytest.fixture
def quick_walks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw_follow, "QUIET", 0.2)
    monkeypatch.setattr(raw_follow, "MOST_UNWALKED", 0.6)


@pytest.mark.usefixtures("quick_walks")
async def test_bytes_are_walked_once_the_connection_is_quiet_with_their_arrival_time() -> None:
    transport = Transport()
    connection = upgraded(transport)

    connection.data_received(server_frame(0x9, b"ping") + text({"type": "event", "version": 0}))
    arrived = connection.arrivals[-1][1]
    walked_at_once = list(connection.texts)
    await asyncio.sleep(0.35)

    assert walked_at_once == []
    assert connection.message(0) == (arrived, {"type": "event", "version": 0})
    assert unmask(bytes(transport.written)) == (0xA, b"ping")


@pytest.mark.usefixtures("quick_walks")
async def test_bytes_that_keep_coming_are_walked_after_most_unwalked() -> None:
    connection = upgraded(Transport())
    started = asyncio.get_running_loop().time()

    while not connection.texts:  # a chunk every 10 ms: never quiet for QUIET
        connection.data_received(text({"type": "event"}))
        await asyncio.sleep(0.01)

    assert 0.55 <= asyncio.get_running_loop().time() - started < 2.0


async def test_what_is_left_is_walked_when_the_connection_is_lost() -> None:
    connection = upgraded(Transport())

    connection.data_received(text({"type": "finished", "version": 3}))
    connection.connection_lost(None)

    assert connection.message(0)[1] == {"type": "finished", "version": 3}
    assert connection.ended.is_set()
