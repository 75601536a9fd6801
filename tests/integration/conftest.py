"""Fixtures and event builders shared by the store and projection tests."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from service.domain import events as ev
from service.projections import batches
from service.store import records
from service.store.event_store import EventStore
from service.store.records import NewEvent, StoredEvent
from service.web.keys import STORE
from tests.support import Service


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
async def store(store_path: Path) -> AsyncIterator[EventStore]:
    store = EventStore(store_path, projectors=[batches.project])
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def run_sql(path: Path, statement: str) -> list[tuple[object, ...]]:
    """Run one statement on its own connection, behind the store's back, and commit."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(statement).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def batch_created(batch_id: str, rows: int = 2) -> ev.BatchCreated:
    """A BatchCreated of `rows` rows, split into upstream batches of at most 20."""
    numbers = range(1, rows + 1)
    chunks = [tuple(numbers[i : i + 20]) for i in range(0, rows, 20)]
    return ev.BatchCreated(
        batch_id=batch_id,
        file_name=f"{batch_id}.csv",
        rows=tuple(ev.Row(n, f"Hospital {n}", f"{n} Main St", None, n + 1) for n in numbers),
        upstream_batches=tuple(
            ev.UpstreamBatch(batch_id if len(chunks) == 1 else f"{batch_id}-{i}", chunk)
            for i, chunk in enumerate(chunks)
        ),
    )


def new_batch(batch_id: str, rows: int = 2) -> list[NewEvent]:
    """The events of an append that creates a batch."""
    return [NewEvent(batch_created(batch_id, rows))]


def completing(batch_id: str) -> list[NewEvent]:
    """The events that take a new_batch of 2 rows to completed: both created, activated."""
    done = (
        ev.HospitalRequested((1, 2), (1, 1)),
        ev.HospitalCreated(1, 101),
        ev.HospitalCreated(2, 102),
        ev.BatchActivated(2, (batch_id,)),
    )
    return [NewEvent(e) for e in done]


def requested(batch_id: str, count: int = 1) -> list[NewEvent]:
    """`count` create intents for row 1: valid any number of times, so good filler."""
    return [NewEvent(ev.HospitalRequested((1,), (attempt,))) for attempt in range(1, count + 1)]


@pytest.fixture
def decoded_on(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of each event decoded from a stored row from here on (clear it to start
    later): readers of large batches must decode off the event loop."""
    threads: list[int] = []
    decode = ev.decode

    def noting_the_thread(*args: Any) -> ev.Event:
        threads.append(threading.get_ident())
        return decode(*args)

    monkeypatch.setattr(records, "decode", noting_the_thread)
    return threads


def hold_after_commit(
    service: Service, monkeypatch: pytest.MonkeyPatch, event_type: str
) -> asyncio.Event:
    """Set once an append of `event_type` has committed; the request that made it is then
    held a moment before it goes on (and has the processor take the batch up)."""
    committed = asyncio.Event()
    store = service.app[STORE]
    append = store.append

    async def held(
        stream_id: str, expected_version: int | None, events: Sequence[NewEvent]
    ) -> list[StoredEvent]:
        stored = await append(stream_id, expected_version, events)
        if any(e.event.type_name == event_type for e in events):
            committed.set()
            await asyncio.sleep(0.3)
        return stored

    monkeypatch.setattr(store, "append", held)
    return committed
