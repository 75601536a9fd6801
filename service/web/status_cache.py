"""Encoded /status bodies shared by every poller of a batch.

A 5,000-row batch's /status is a large body; twenty pollers must not each read and
encode it while the batch runs. A finished batch's body is reused until its version
moves. A running batch's is reused for `max_age` seconds while its status stays the same,
and answered while its successor is built if younger than twice that (the body carries
`version`, so the delay is visible); a change of status always waits for a fresh body.
The bodies of the batches read last are kept, up to `size` of them and `max_bytes` in all:
with `csv.max_rows` raised, one batch's body can be 10 MB.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from service.domain import batch as b
from service.projections import queries
from service.store.event_store import EventStore
from service.web import presenters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    version: int
    status: str
    built_at: float
    body: bytes


class StatusCache:
    """The last encoded /status body of the most recently read batches."""

    def __init__(self, max_age: float, size: int = 64, max_bytes: int = 32 << 20) -> None:
        self.max_age, self.size, self.max_bytes = max_age, size, max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0  # of the bodies in _entries
        self._building: dict[tuple[str, str], asyncio.Future[bytes]] = {}
        self._warming: set[asyncio.Task[bytes | None]] = set()

    def warm(
        self, store: EventStore, batch_id: str, batch: dict[str, Any] | None = None
    ) -> asyncio.Task[bytes | None]:
        """Bring the batch's body up to date in the background (its status just changed)."""
        task = asyncio.ensure_future(self.body(store, batch_id, batch))
        self._warming.add(task)
        task.add_done_callback(self._warmed)
        return task

    async def close(self) -> None:
        """Stop the builds under way (before the store closes)."""
        pending: list[asyncio.Future[Any]] = [*self._warming, *self._building.values()]
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _warmed(self, task: asyncio.Task[bytes | None]) -> None:
        self._warming.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("warming a /status body failed", exc_info=task.exception())

    async def body(
        self, store: EventStore, batch_id: str, batch: dict[str, Any] | None = None
    ) -> bytes | None:
        """The batch's /status body as JSON bytes, None when there is no such batch.

        `batch` is its read-model row when the caller has it already (a batch being worked
        on is folded in memory), so the body's freshness is checked without a read.
        """
        if batch is None:
            batch = await queries.get_batch(store, batch_id)
        if batch is None:
            return None
        now = time.monotonic()
        entry = self._entries.get(batch_id)
        same_status = entry is not None and entry.status == batch["status"]
        running = batch["status"] not in b.FINISHED
        # A running batch's body ages even at the same version: its processing time runs on.
        if entry is not None and (
            (not running and entry.version == batch["stream_version"])
            or (running and same_status and now - entry.built_at < self.max_age)
        ):
            self._entries.move_to_end(batch_id)
            return entry.body
        building = self._start_build(store, batch, now)
        if (
            entry is not None
            and running
            and same_status
            and now - entry.built_at < 2 * self.max_age
        ):
            # Old, but of the same status and not by much: answer with it while the new
            # one is built (a sparse poller waits instead, or it would always get the
            # body its previous poll started).
            return entry.body
        return await asyncio.shield(building)

    def _start_build(
        self, store: EventStore, batch: dict[str, Any], now: float
    ) -> asyncio.Future[bytes]:
        """One build at a time per batch and status; pollers arriving meanwhile share it."""
        key = (batch["batch_id"], batch["status"])
        building = self._building.get(key)
        if building is None:
            building = asyncio.ensure_future(self._build(store, batch, now))
            self._building[key] = building
            building.add_done_callback(functools.partial(self._built, key))
        return building

    def _built(self, key: tuple[str, str], building: asyncio.Future[bytes]) -> None:
        self._building.pop(key, None)
        if not building.cancelled() and building.exception() is not None:
            log.warning(
                "building the /status body of %s failed", key[0], exc_info=building.exception()
            )

    async def _build(self, store: EventStore, batch: dict[str, Any], now: float) -> bytes:
        batch_id = batch["batch_id"]
        # SQLite encodes the rows (thousands of them) off the event loop; they go last. The
        # numbers come from the same read, not from `batch`: the log may have moved since.
        snapshot = await queries.status_snapshot(store, batch_id)
        assert snapshot is not None, "a batch's read model is never deleted"
        read, rows = snapshot
        body = orjson.dumps(presenters.status_numbers(read))[:-1] + b',"hospitals":' + rows + b"}"
        self._forget(batch_id)
        self._entries[batch_id] = _Entry(read["stream_version"], read["status"], now, body)
        self._bytes += len(body)
        while len(self._entries) > 1 and (
            len(self._entries) > self.size or self._bytes > self.max_bytes
        ):
            self._forget(next(iter(self._entries)))  # the body read longest ago
        return body

    def _forget(self, batch_id: str) -> None:
        if (entry := self._entries.pop(batch_id, None)) is not None:
            self._bytes -= len(entry.body)
