"""Each followed batch as websocket messages: folded once, encoded once, sent to every follower.

Hundreds of sockets may follow one batch. The message for a stream version is the same for
all of them, so one feed per stream reads the log, folds each event and encodes its message,
and each socket only sends the bytes from its own position on.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import struct
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from service.domain import batch as b
from service.store.event_store import READ_PAGE, EventStore
from service.store.records import StoredEvent, from_row
from service.web import presenters

BURST_BYTES = 1 << 16  # event frames a socket writes together, at most (and at least one)
BURSTS_KEPT = 16  # bursts a feed keeps for the sockets at their version, the last built ones


@dataclass(frozen=True)
class Message:
    """An `event` message, framed, and where its event is in the log."""

    frame: bytes  # the whole websocket frame, so a socket only writes it
    position: int  # the event's global log position
    status: str  # the batch's status after the event
    finished: bytes | None  # the `finished` message, when the batch is settled after this event


def text_frame(payload: bytes) -> bytes:
    """A final, unmasked text frame (RFC 6455, 5.2): one message from a server."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


def _whole(kind: str, state: b.BatchState) -> bytes:
    """A snapshot or finished message: progress and status as of the state's version."""
    batch, rows = presenters.records_of(state)
    message = {
        "type": kind,
        "version": state.version,
        "progress": presenters.progress(batch),
        "status": presenters.status(batch, rows),
    }
    return orjson.dumps(message)


def _event_message(event: StoredEvent, state: b.BatchState) -> bytes:
    """One event and the progress right after it."""
    message: dict[str, Any] = {
        "type": "event",
        "version": event.stream_version,
        "event": event.to_json(),
        "progress": presenters.progress(presenters.batch_record(state)),
    }
    return orjson.dumps(message)


def _advance(state: b.BatchState | None, event: StoredEvent) -> tuple[b.BatchState, Message]:
    """The state with one more event folded in (the first event starts it), and the message."""
    if state is None:
        state = b.fold([(event.decode(), event.recorded_at)])
    else:
        state = b.apply(state, event.decode(), event.recorded_at)
    settled = state.finished and not state.unsettled()
    finished = _whole("finished", state) if settled else None
    frame = text_frame(_event_message(event, state))
    return state, Message(frame, event.global_position, state.status, finished)


def _catch_up(rows: list[tuple[Any, ...]]) -> tuple[b.BatchState, list[Message], bytes]:
    """The state, messages and snapshot of a stream's events so far, selected as
    EVENT_COLUMNS: a 50,000-row batch takes most of a second to decode and fold, so a
    feed does this in a thread before anyone else sees its state."""
    state, messages = None, []
    for row in rows:
        state, message = _advance(state, from_row(row))
        messages.append(message)
    assert state is not None, "rows holds one event at least"
    return state, messages, _whole("snapshot", state)


class Feed:
    """One batch stream's messages, from its first event on, kept while anyone follows it."""

    def __init__(self, store: EventStore, stream_id: str) -> None:
        self.stream_id = stream_id
        self.messages: list[Message] = []  # by stream version
        self.state: b.BatchState | None = None
        self._snapshot: tuple[int, bytes] | None = None  # the last one built, and its version
        self._bursts: dict[int, tuple[bytes, int]] = {}  # by the version they follow
        self.followers = 0
        self._moved = asyncio.Event()
        self._reading = asyncio.create_task(self._read(store, stream_id))

    @property
    def version(self) -> int:
        """The last stream version folded in, -1 before the first."""
        return len(self.messages) - 1

    def finished_message(self, version: int) -> bytes | None:
        """The `finished` message if the batch is settled as of `version`, else None."""
        return self.messages[version].finished if version >= 0 else None

    def snapshot(self) -> bytes:
        """The `snapshot` message as of the last version folded in.

        Sockets connecting together get the same bytes: a large batch's snapshot holds
        every row, and is built once per version.
        """
        assert self.state is not None, "wait_past(-1) first"
        if self._snapshot is None or self._snapshot[0] != self.version:
            self._snapshot = (self.version, _whole("snapshot", self.state))
        return self._snapshot[1]

    def burst(self, after: int) -> tuple[bytes, int]:
        """The frames of the messages after version `after` that a socket writes at once, and
        the last version among them.

        A burst holds one message at least and BURST_BYTES at most, and ends with a message
        that finishes the batch. Sockets at the same version share it: it is built once for
        each version until the next message comes in, for the versions last asked about.
        """
        if (built := self._bursts.get(after)) is not None:
            return built
        frames, version = bytearray(), after
        while version < self.version:
            version += 1
            message = self.messages[version]
            frames += message.frame
            if message.finished or len(frames) >= BURST_BYTES:
                break
        if len(self._bursts) >= BURSTS_KEPT:  # sockets replaying from many versions
            del self._bursts[next(iter(self._bursts))]
        built = self._bursts[after] = (bytes(frames), version)
        return built

    def first_past(self, position: int) -> int | None:
        """The version of the first message whose event is after log `position`, if any yet."""
        version = bisect.bisect_right(self.messages, position, key=lambda m: m.position)
        return version if version <= self.version else None

    async def wait_past(self, version: int) -> None:
        """Return once a message after `version` is in; raise if reading the log failed."""
        while self.version <= version:
            if self._reading.done():
                failure = self._reading.exception()
                raise RuntimeError(f"{self.stream_id}: reading the log failed") from failure
            await self._moved.wait()

    async def close(self) -> None:
        self._reading.cancel()
        await asyncio.gather(self._reading, return_exceptions=True)
        # A cancelled task keeps its CancelledError, whose traceback holds _read's frame and
        # so this feed, with every message of its batch: a cycle only a full collection
        # frees, and none ran in a 36-minute soak (app.py tunes the collector). result()
        # hands the error over, and the feed goes with its last follower.
        if self._reading.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                self._reading.result()
        elif (failure := self._reading.exception()) is not None:
            # A failed task keeps its error whatever is asked of it: its frames keep where
            # the read failed, for the log, but no longer this feed.
            traceback.clear_frames(failure.__traceback__)

    async def _read(self, store: EventStore, stream_id: str) -> None:
        try:
            await self._read_so_far(store, stream_id)
            # follow() is an async generator: close it with us, not when it is collected.
            async with contextlib.aclosing(store.follow(stream_id, self.version)) as events:
                async for event in events:
                    self.state, message = _advance(self.state, event)
                    self._added([message])
        finally:
            self._moved.set()  # followers see the failure rather than wait forever

    async def _read_so_far(self, store: EventStore, stream_id: str) -> None:
        """Publish the stream's events so far, folded in a thread. A method of its own: the
        undecoded rows (half as large again as the messages) and the first snapshot go with
        its frame, not with _read's, which lasts as long as the feed."""
        rows: list[tuple[Any, ...]] = []
        while page := await store.stream_rows(stream_id, len(rows) - 1, READ_PAGE):
            rows += page
        if rows:
            self.state, messages, snapshot = await asyncio.to_thread(_catch_up, rows)
            self._snapshot = (len(rows) - 1, snapshot)
            self._added(messages)

    def _added(self, messages: list[Message]) -> None:
        self.messages += messages
        self._bursts.clear()
        # follow() hands over a commit's events together: followers wake once for all of them.
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()


class Feeds:
    """The feeds of the batches being followed: one per stream, dropped with its last follower."""

    def __init__(self) -> None:
        self._feeds: dict[str, Feed] = {}

    @contextlib.asynccontextmanager
    async def follow(self, store: EventStore, stream_id: str) -> AsyncIterator[Feed]:
        """The stream's feed, started by its first follower."""
        feed = self._feeds.get(stream_id)
        if feed is None:
            feed = self._feeds[stream_id] = Feed(store, stream_id)
        feed.followers += 1
        try:
            yield feed
        finally:
            feed.followers -= 1
            if not feed.followers:
                del self._feeds[stream_id]
                await feed.close()
