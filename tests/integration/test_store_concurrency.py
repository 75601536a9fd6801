"""Races on the single writer, cancelled callers, and live followers that must miss nothing."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import aclosing, closing
from pathlib import Path

import pytest

from service.store import event_store
from service.store.event_store import EventStore
from service.store.records import ConcurrencyError, StoredEvent
from tests.integration.conftest import new_batch, requested


async def take(store: EventStore, count: int, stream_id: str, **after: int) -> list[StoredEvent]:
    """The first `count` events store.follow(stream_id, **after) yields."""
    got: list[StoredEvent] = []
    async with aclosing(store.follow(stream_id, **after)) as events:
        async for event in events:
            got.append(event)
            if len(got) == count:
                break
    return got


async def test_same_expected_version_exactly_one_append_wins(store: EventStore) -> None:
    await store.append("batch-a", -1, new_batch("a"))

    outcomes = await asyncio.gather(
        store.append("batch-a", 0, requested("a")),
        store.append("batch-a", 0, requested("a")),
        return_exceptions=True,
    )

    winners = [o for o in outcomes if isinstance(o, list)]
    losers = [o for o in outcomes if isinstance(o, ConcurrencyError)]
    assert (len(winners), len(losers)) == (1, 1)
    assert await store.read_stream("batch-a", after_version=0) == winners[0]


async def test_a_thousand_concurrent_appends_all_commit_densely(store: EventStore) -> None:
    appends = [store.append(f"batch-{i}", -1, new_batch(str(i), rows=1)) for i in range(1000)]
    reads = [store.log_rows(limit=10) for _ in range(20)]

    outcomes = await asyncio.gather(*appends, *reads, return_exceptions=True)

    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert failures == []
    stored = [events[0] for events in outcomes[:1000]]  # type: ignore[index]
    assert sorted(e.global_position for e in stored) == list(range(1, 1001))
    assert len(await store.log_rows(limit=2000)) == 1000
    assert store.head.position == 1000


async def test_cancelled_caller_does_not_cancel_the_commit(store: EventStore) -> None:
    caller = asyncio.create_task(store.append("batch-a", -1, new_batch("a")))
    await asyncio.sleep(0)  # the append is queued, its commit not done yet
    assert not caller.done()

    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(store.head.wait_past(0), timeout=5)

    assert [e.event_type for e in await store.read_stream("batch-a")] == ["BatchCreated"]


async def test_follow_stream_yields_every_later_version_once_in_order(store: EventStore) -> None:
    await store.append("batch-a", -1, new_batch("a") + requested("a", 4))  # versions 0..4
    await store.append("batch-b", -1, new_batch("b"))
    follower = asyncio.create_task(take(store, 7, stream_id="batch-a", after_version=2))
    await asyncio.sleep(0.01)

    for _ in range(5):  # versions 5..9, interleaved with another stream
        await asyncio.gather(
            store.append("batch-a", None, requested("a")),
            store.append("batch-b", None, requested("b")),
        )

    got = await asyncio.wait_for(follower, timeout=5)
    assert [e.stream_version for e in got] == list(range(3, 10))
    assert {e.stream_id for e in got} == {"batch-a"}


async def test_follow_misses_nothing_under_concurrent_appends(store: EventStore) -> None:
    follower = asyncio.create_task(take(store, 25, stream_id="batch-1"))

    async def writer(n: int) -> None:
        await store.append(f"batch-{n}", -1, new_batch(str(n)))
        for _ in range(24):
            await store.append(f"batch-{n}", None, requested(str(n)))
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(n) for n in range(1, 21)))

    got = await asyncio.wait_for(follower, timeout=10)
    assert [e.stream_version for e in got] == list(range(25))
    assert {e.stream_id for e in got} == {"batch-1"}


async def test_follow_reads_what_memory_no_longer_holds_from_the_database(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_store, "RECENT_EVENTS", 4)
    store = EventStore(store_path)
    await store.open()
    try:
        await store.append("batch-a", -1, new_batch("a") + requested("a", 9))  # positions 1..10
        parked, wait_past = asyncio.Event(), store.head.wait_past

        async def noting(position: int) -> None:
            parked.set()
            await wait_past(position)

        monkeypatch.setattr(store.head, "wait_past", noting)
        follower = asyncio.create_task(take(store, 15, stream_id="batch-a"))
        await asyncio.wait_for(parked.wait(), timeout=5)  # caught up at 10, waiting
        # 11..15: memory keeps 12..15, so 11, just one past the follower, is read from disk.
        await store.append("batch-a", 9, requested("a", 5))
        got = await asyncio.wait_for(follower, timeout=5)
    finally:
        await store.close()

    assert [e.global_position for e in got] == list(range(1, 16))


async def test_a_repeated_append_of_an_earlier_commit_leaves_head_and_followers_alone(
    store: EventStore,
) -> None:
    first = new_batch("a")
    await store.append("batch-a", -1, first)  # 1
    await store.append("batch-a", 0, requested("a"))  # 2
    follower = asyncio.create_task(take(store, 3, stream_id="batch-a"))

    again = await store.append("batch-a", -1, first)  # a retry, alone in its commit
    assert [e.global_position for e in again] == [1]
    assert store.head.position == 2
    await store.append("batch-a", 1, requested("a", 1))  # 3

    got = await asyncio.wait_for(follower, timeout=5)
    assert [e.global_position for e in got] == [1, 2, 3]


async def test_follow_yields_a_retried_append_once(store: EventStore) -> None:
    retried = new_batch("a")

    # Both land in one group commit: the second finds the first's ids stored.
    first, second = await asyncio.gather(
        store.append("batch-a", -1, retried), store.append("batch-a", -1, retried)
    )
    await store.append("batch-a", 0, requested("a"))

    got = await asyncio.wait_for(take(store, 2, stream_id="batch-a"), timeout=5)
    assert first == second
    assert [e.global_position for e in got] == [1, 2]


def size_of(path: Path) -> int:
    return path.stat().st_size


async def test_the_wal_shrinks_back_after_a_long_reader_lets_go(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader holding a snapshot (`events | less`) keeps every commit in the WAL meanwhile;
    # once it let go, the file stayed at its peak (109 MB after 3,000 rows) until the
    # service stopped.
    monkeypatch.setattr(event_store, "WAL_SIZE_LIMIT", 64 * 1024)
    wal = Path(f"{store_path}-wal")
    store = EventStore(store_path)
    await store.open()
    try:
        with closing(sqlite3.connect(store_path, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM events").fetchone()
            for i in range(300):
                await store.append(f"batch-{i}", -1, new_batch(str(i), rows=20))
            grown = size_of(wal)
        await store.append("batch-x", -1, new_batch("x"))  # checkpoints what the reader held
        await store.append("batch-y", -1, new_batch("y"))  # starts the WAL over
        left = size_of(wal)
    finally:
        await store.close()

    assert grown > 1024 * 1024
    assert left <= 64 * 1024
