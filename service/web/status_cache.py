"""Encoded /status bodies shared by every poller of a batch.

A 5,000-row batch's /status is a large body; twenty pollers must not each read and
encode it while the batch runs. A finished batch's body is reused until its version
moves; a running batch's for at most `max_age` seconds while its status stays the
same (the body carries `version`, so the delay is visible).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from service.domain import batch as b
from service.projections import queries
from service.store.event_store import EventStore
from service.web import presenters


@dataclass(frozen=True)
class _Entry:
    version: int
    status: str
    built_at: float
    body: bytes


class StatusCache:
    """The last encoded /status body of the most recently read batches."""

    def __init__(self, max_age: float, size: int = 64) -> None:
        self.max_age, self.size = max_age, size
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._building: dict[tuple[str, str], asyncio.Future[bytes]] = {}

    async def body(self, store: EventStore, batch_id: str) -> bytes | None:
        """The batch's /status body as JSON bytes, None when there is no such batch."""
        batch = await queries.get_batch(store, batch_id)
        if batch is None:
            return None
        now = time.monotonic()
        entry = self._entries.get(batch_id)
        running = batch["status"] not in b.FINISHED
        if entry is not None and (
            entry.version == batch["stream_version"]
            or (running and entry.status == batch["status"] and now - entry.built_at < self.max_age)
        ):
            self._entries.move_to_end(batch_id)
            return entry.body
        # One build at a time per batch and status: pollers arriving meanwhile wait for it.
        key = (batch_id, batch["status"])
        building = self._building.get(key)
        if building is None:
            building = asyncio.ensure_future(self._build(store, batch, now))
            self._building[key] = building
            building.add_done_callback(lambda _: self._building.pop(key, None))
        return await asyncio.shield(building)

    async def _build(self, store: EventStore, batch: dict[str, Any], now: float) -> bytes:
        batch_id = batch["batch_id"]
        rows = await queries.get_rows(store, batch_id)
        body = json.dumps(presenters.status(batch, rows)).encode()
        self._entries[batch_id] = _Entry(batch["stream_version"], batch["status"], now, body)
        self._entries.move_to_end(batch_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return body
