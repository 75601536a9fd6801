"""The store contract: what append promises, what the database refuses, how reads page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import shutil
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiosqlite
import pytest

from service.domain import events as ev
from service.projections import queries
from service.store import event_store
from service.store.event_store import READ_PAGE, EventStore, _Readers
from service.store.records import (
    ConcurrencyError,
    DuplicateEventError,
    NewEvent,
    StoredEvent,
    from_row,
)
from tests.integration.conftest import new_batch, requested, run_sql
from tests.support import without_collections


async def read_all(
    store: EventStore, after_position: int = 0, limit: int = READ_PAGE
) -> list[StoredEvent]:
    """The log's events after `after_position`, as /events reads and then decodes them."""
    return [from_row(r) for r in await store.log_rows(after_position, limit)]


async def positions(store: EventStore) -> list[int]:
    return [e.global_position for e in await read_all(store, limit=10_000)]


async def test_empty_append_returns_nothing_and_writes_nothing(store: EventStore) -> None:
    assert await store.append("batch-a", -1, []) == []
    assert await read_all(store) == []
    assert store.head.position == 0


async def test_append_returns_what_reads_return(store: EventStore) -> None:
    appended = await store.append("batch-a", -1, new_batch("a") + requested("a", 2))

    assert [e.stream_version for e in appended] == [0, 1, 2]
    assert await store.read_stream("batch-a") == appended
    assert await read_all(store) == appended
    assert await store.stream_version("batch-a") == 2
    assert store.head.position == appended[-1].global_position


async def test_stream_of_a_new_batch_decodes_to_the_appended_events(store: EventStore) -> None:
    new = new_batch("a") + requested("a")
    await store.append("batch-a", -1, new)

    stored = await store.read_stream("batch-a")

    assert [e.decode() for e in stored] == [n.event for n in new]
    assert [e.event_id for e in stored] == [n.event_id for n in new]


@pytest.mark.parametrize("expected", [-1, 0, 2])
async def test_wrong_expected_version_raises_and_writes_nothing(
    store: EventStore, expected: int
) -> None:
    await store.append("batch-a", -1, new_batch("a") + requested("a"))

    with pytest.raises(ConcurrencyError) as caught:
        await store.append("batch-a", expected, requested("a"))

    assert (caught.value.expected, caught.value.actual) == (expected, 1)
    assert await positions(store) == [1, 2]


async def test_a_refused_append_and_its_caller_go_without_a_garbage_collection(
    store: EventStore,
) -> None:
    # The refusal's traceback held the writer's frame, whose list of outcomes held the
    # refusal, and the append's frame, whose future held it: two cycles that kept the
    # refused events and the caller's frame (an upload's file and rows, when two uploads
    # with one Idempotency-Key raced) until a full collection, which app.py makes rare.
    await store.append("batch-a", -1, new_batch("a"))

    class Upload:
        """What the caller's frame holds."""

    async def refused() -> tuple[bool, weakref.ref[Upload], weakref.ref[NewEvent]]:
        upload, events, was_refused = Upload(), new_batch("a", rows=3), False
        try:
            await store.append("batch-a", -1, events)
        except ConcurrencyError:  # as an upload that lost the race for its key
            was_refused = True
        return was_refused, weakref.ref(upload), weakref.ref(events[0])

    with without_collections():
        was_refused, upload, event = await refused()
        await store.append("batch-b", -1, new_batch("b"))  # the writer's next group
        assert was_refused
        assert upload() is None
        assert event() is None


async def test_an_append_that_fails_in_the_writer_says_where(
    store: EventStore, store_path: Path
) -> None:
    # A failure that is not a refusal (a read model's constraint, a projector's bug) is
    # logged with the caller's 500: its traceback must still reach the line that failed.
    run_sql(
        store_path,
        "CREATE TRIGGER no_rows BEFORE INSERT ON batch_rows "
        "BEGIN SELECT RAISE(ABORT, 'no rows today'); END",
    )
    with pytest.raises(sqlite3.IntegrityError) as raised:
        await store.append("batch-a", -1, new_batch("a"))

    assert "_insert_batch" in [frame.name for frame in raised.traceback]


async def test_expected_version_none_appends_at_the_end(store: EventStore) -> None:
    await store.append("batch-a", -1, new_batch("a") + requested("a"))

    appended = await store.append("batch-a", None, requested("a", 2))

    assert [e.stream_version for e in appended] == [2, 3]


async def test_failing_append_stores_none_of_its_events_and_spares_its_group(
    store: EventStore,
) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=2))
    # The projector refuses the second event (row 99 does not exist), after the first passed.
    doomed = [*requested("b"), NewEvent(ev.HospitalCreated(99, 1234))]

    first, failed, last = await asyncio.gather(
        store.append("batch-a", -1, new_batch("a")),
        store.append("batch-b", 0, doomed),
        store.append("batch-c", -1, new_batch("c")),
        return_exceptions=True,
    )

    assert isinstance(failed, ValueError)
    assert not isinstance(first, BaseException) and not isinstance(last, BaseException)
    assert first[0].recorded_at == last[0].recorded_at  # one group commit
    assert await store.stream_version("batch-b") == 0
    assert (await queries.get_batch(store, "b") or {})["status"] == "pending"
    assert await positions(store) == [1, 2, 3]


async def test_a_commit_that_fails_leaves_the_stream_where_it_was(
    store: EventStore, store_path: Path
) -> None:
    await store.append("batch-a", -1, new_batch("a"))  # version 0
    # A deferred foreign key is checked at COMMIT, after every statement passed: an intent
    # of attempt 99 inserts a child with no parent, so that COMMIT fails.
    for statement in (
        "CREATE TABLE test_parent(id INTEGER PRIMARY KEY)",
        "CREATE TABLE test_child(parent INTEGER REFERENCES test_parent(id) "
        "DEFERRABLE INITIALLY DEFERRED)",
        "CREATE TRIGGER test_fail AFTER INSERT ON events WHEN NEW.data LIKE '%99%' "
        "BEGIN INSERT INTO test_child VALUES (42); END",
    ):
        run_sql(store_path, statement)
    with pytest.raises(sqlite3.IntegrityError):
        await store.append("batch-a", 0, [NewEvent(ev.HospitalRequested((1,), (99,)))])

    assert await store.stream_version("batch-a") == 0
    stored = await store.append("batch-a", 0, [NewEvent(ev.HospitalRequested((1,), (1,)))])
    assert [e.stream_version for e in stored] == [1]


async def test_positions_stay_dense_through_conflicts_and_failures(store: EventStore) -> None:
    await store.append("batch-a", -1, new_batch("a"))
    await store.append("batch-b", -1, new_batch("b"))
    outcomes = await asyncio.gather(
        store.append("batch-a", 0, requested("a", 2)),
        store.append("batch-a", 0, requested("a")),  # loses the race to the line above
        store.append("batch-b", 0, [NewEvent(ev.HospitalCreated(7, 1))]),  # no row 7
        store.append("batch-b", None, requested("b", 3)),
        return_exceptions=True,
    )
    await store.append("batch-a", None, requested("a"))

    assert [type(o).__name__ for o in outcomes] == [
        "list",
        "ConcurrencyError",
        "ValueError",
        "list",
    ]
    assert await positions(store) == list(range(1, 9))
    versions = [e.stream_version for e in await store.read_stream("batch-a")]
    assert versions == [0, 1, 2, 3]


async def test_reappending_stored_event_ids_returns_them_and_writes_nothing(
    store: EventStore,
) -> None:
    events = new_batch("a") + requested("a")
    first = await store.append("batch-a", -1, events)

    # A retry carries the stale expected version: idempotency is checked first.
    again = await store.append("batch-a", -1, events)

    assert [e.global_position for e in again] == [e.global_position for e in first]
    assert again == first
    assert await positions(store) == [1, 2]


async def test_partly_stored_event_ids_raise_and_write_nothing(store: EventStore) -> None:
    events = new_batch("a") + requested("a")
    await store.append("batch-a", -1, events)

    with pytest.raises(DuplicateEventError):
        await store.append("batch-a", None, events[1:] + requested("a"))

    assert await positions(store) == [1, 2]


async def test_event_ids_stored_in_another_stream_raise(store: EventStore) -> None:
    events = new_batch("a")
    await store.append("batch-a", -1, events)

    with pytest.raises(DuplicateEventError):
        await store.append("batch-b", -1, events)

    assert await store.stream_version("batch-b") == -1


# REPLACE deletes the event it collides with, firing no DELETE trigger: one by each key.
REPLACE = (
    "REPLACE INTO events (global_position, event_id, stream_id, stream_version, event_type, "
    "schema_version, data, metadata, recorded_at) SELECT {}, event_type, schema_version, "
    "'{{}}', metadata, 'later' FROM events"
)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET data = '{}' WHERE global_position = 1",
        "DELETE FROM events",
        REPLACE.format("global_position, 'new-id', 'batch-z', 0"),
        REPLACE.format("NULL, event_id, 'batch-z', 0"),
        REPLACE.format("NULL, 'new-id', stream_id, stream_version"),
    ],
    ids=["update", "delete", "replace-position", "replace-id", "replace-stream-version"],
)
async def test_database_refuses_to_edit_the_log(
    store: EventStore, store_path: Path, statement: str
) -> None:
    await store.append("batch-a", -1, new_batch("a"))
    before = await read_all(store)

    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        run_sql(store_path, statement)

    assert await read_all(store) == before


async def test_read_stream_after_version_and_limit(store: EventStore) -> None:
    await store.append("batch-a", -1, new_batch("a") + requested("a", 5))
    await store.append("batch-b", -1, new_batch("b"))

    after_two = await store.read_stream("batch-a", after_version=2)
    page = await store.read_stream("batch-a", after_version=0, limit=2)

    assert [e.stream_version for e in after_two] == [3, 4, 5]
    assert [e.stream_version for e in page] == [1, 2]
    assert await store.stream_rows("batch-a", limit=0) == []  # none, not all: None is all
    assert await store.read_stream("batch-missing") == []
    assert await store.stream_version("batch-missing") == -1


async def test_the_log_pages_in_order(store: EventStore) -> None:
    await store.append("batch-a", -1, new_batch("a") + requested("a", 2))
    await store.append("batch-b", -1, new_batch("b") + requested("b", 3))

    page = await read_all(store, after_position=2, limit=3)
    rest = await read_all(store, after_position=page[-1].global_position)

    assert [e.global_position for e in page] == [3, 4, 5]
    assert [e.global_position for e in rest] == [6, 7]
    assert [e.stream_id for e in page + rest] == ["batch-a"] + ["batch-b"] * 4


async def test_a_page_in_characters_holds_the_events_that_fill_it_exactly(
    store: EventStore,
) -> None:
    await store.append("batch-a", -1, new_batch("a") + requested("a", 2))
    rows = await store.log_rows(0)
    sizes = [len(data) + len(metadata) for *_, data, metadata, _ in rows]

    page = await store.log_rows(0, most_chars=sizes[0] + sizes[1])

    # "Up to" its size: the event that makes it exactly full is in it, not on the next page.
    assert [r[0] for r in page] == [r[0] for r in rows[:2]]


async def test_a_reader_that_cannot_open_leaves_no_connection_or_thread_behind(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect = aiosqlite.connect
    opened: list[str] = []

    def connect(path: str) -> aiosqlite.Connection:
        if len(opened) == 2:
            raise sqlite3.OperationalError("unable to open database file")
        opened.append(path)
        return real_connect(path)

    monkeypatch.setattr(aiosqlite, "connect", connect)
    before = set(threading.enumerate())
    store = EventStore(store_path, readers=3)

    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        await store.open()

    assert len(opened) == 2
    # aiosqlite answers a close from the connection's thread just before that thread returns,
    # so a reader's thread can outlive the await by a moment: wait for the threads open()
    # started to end (one left behind never does), rather than count them at once.
    deadline = time.monotonic() + 5.0
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not left, [t.name for t in left]  # the writer's and both readers' threads ended
    with pytest.raises(RuntimeError, match="not open"):
        await store.append("batch-a", -1, new_batch("a"))


async def test_a_file_that_is_no_database_leaves_no_connection_open(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await asyncio.to_thread(store_path.write_bytes, b"\x13" * 3 * 4096)
    real_connect = sqlite3.connect
    opened: list[sqlite3.Connection] = []

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = real_connect(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)

    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        await EventStore(store_path).open()

    assert opened
    for conn in opened:  # Python 3.13 and later warn of one left for the collector
        with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
            conn.execute("SELECT 1")


async def test_a_writer_that_fails_is_logged_and_the_store_still_closes(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = set(threading.enumerate())
    store = EventStore(store_path)
    await store.open()

    def broken(position: int) -> None:
        raise RuntimeError("an error the writer did not expect")

    monkeypatch.setattr(store.head, "advance", broken)
    await store.append("batch-a", -1, new_batch("a"))  # committed; then the writer fails
    await asyncio.sleep(0)
    assert not store.can_commit
    with pytest.raises(RuntimeError, match="not open"):
        await store.append("batch-b", -1, new_batch("b"))

    await asyncio.wait_for(store.close(), 5)  # it re-raised the writer's error, and left
    # the readers' and writer's threads running: a process that never ended on SIGTERM

    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "event-writer stopped on an error"
    ]
    deadline = time.monotonic() + 5.0
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not left, [t.name for t in left]


async def test_a_writer_that_fails_while_the_store_closes_does_not_hold_the_close(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EventStore(store_path)
    await store.open()
    commit, entered, release = store._commit, threading.Event(), threading.Event()

    def held(group: list[Any]) -> list[Any]:
        entered.set()
        release.wait(5)
        return commit(group)

    def broken(position: int) -> None:
        raise RuntimeError("an error the writer did not expect")

    monkeypatch.setattr(store, "_commit", held)
    monkeypatch.setattr(store.head, "advance", broken)
    first = asyncio.create_task(store.append("batch-a", -1, new_batch("a")))
    assert await asyncio.to_thread(entered.wait, 5)  # the writer commits batch-a's group
    queued = asyncio.create_task(store.append("batch-b", -1, new_batch("b")))
    await asyncio.sleep(0)
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)  # close() waits for the queue; then the writer fails
    release.set()

    await asyncio.wait_for(closing, 5)  # it waited for a queue no one would empty: forever

    assert len(await first) == 1
    with pytest.raises(RuntimeError, match="not open"):
        await queued


async def test_a_database_at_its_page_limit_is_the_error_an_append_gives(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect = event_store.connect_writer

    def small(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = connect(path, busy_timeout_ms)
        conn.execute("PRAGMA max_page_count = 25")  # about 40 KiB past what open() takes
        return conn

    monkeypatch.setattr(event_store, "connect_writer", small)
    store = EventStore(store_path)
    await store.open()
    try:
        # A statement that needs a page past the limit: SQLite undoes it alone, as inserts
        # into events run under a statement journal (events_no_replace is a trigger on
        # them), and the append with it. Its group commits: a full disk fails the COMMIT.
        with pytest.raises(sqlite3.OperationalError, match="full"):
            await store.append("batch-a", -1, new_batch("a", rows=1000))
        assert store.commit_error is None
        await store.append("batch-b", -1, new_batch("b"))  # room enough for a small one
    finally:
        await store.close()


async def test_a_commit_error_clears_once_commits_land_again_with_none_asked(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_store, "COMMIT_RETRY_SECONDS", 0.05)
    store = EventStore(store_path, busy_timeout_ms=50)
    await store.open()
    try:
        with contextlib.closing(sqlite3.connect(store_path, isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await store.append("batch-a", -1, new_batch("a"))
            await asyncio.sleep(0.2)
            assert not store.can_commit  # still failing: the lock is held
        deadline = time.monotonic() + 5.0
        while not store.can_commit:  # an idle service stayed 503 for good
            assert time.monotonic() < deadline, store.commit_error
            await asyncio.sleep(0.01)
        assert await read_all(store, 0) == []
    finally:
        await store.close()


@contextlib.contextmanager
def no_file_grows_past(path: Path) -> Iterator[None]:
    """This process may not write any file past the size `path` has now while the block
    runs: as on a full disk, a commit that adds a page to the WAL fails (SIGXFSZ is
    ignored by Python, so the write fails instead of killing it)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)


async def test_a_commit_error_stays_while_the_disk_is_still_full(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_store, "COMMIT_RETRY_SECONDS", 0.05)
    store = EventStore(store_path)
    await store.open()
    try:
        await store.append("batch-a", -1, new_batch("a"))
        with no_file_grows_past(Path(f"{store_path}-wal")):
            with pytest.raises(sqlite3.OperationalError):
                await store.append("batch-b", -1, new_batch("b"))
            await asyncio.sleep(0.3)  # several empty commits tried meanwhile
            # They wrote nothing, so they landed on the full disk: /health said 200 again
            # a second after each failure while every append kept failing.
            assert not store.can_commit
            with pytest.raises(sqlite3.OperationalError):
                await store.append("batch-b", -1, new_batch("b"))
        deadline = time.monotonic() + 5.0
        while not store.can_commit:  # room again: the next empty commit lands
            assert time.monotonic() < deadline, store.commit_error
            await asyncio.sleep(0.01)
        await store.append("batch-b", -1, new_batch("b"))
    finally:
        await store.close()


async def test_an_append_that_spills_onto_a_full_disk_fails_with_the_disks_error(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect = event_store.connect_writer

    def spilling(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = connect(path, busy_timeout_ms)
        conn.execute("PRAGMA cache_size = 10")  # pages go to the WAL before the COMMIT
        return conn

    monkeypatch.setattr(event_store, "connect_writer", spilling)
    store = EventStore(store_path)
    await store.open()
    try:
        await store.append("batch-a", -1, new_batch("a"))
        # SQLite undoes the whole transaction, its savepoints with it: rolling back to the
        # append's savepoint then failed, and that error hid the disk's.
        with (
            no_file_grows_past(Path(f"{store_path}-wal")),
            pytest.raises(sqlite3.OperationalError, match="disk I/O error"),
        ):
            await store.append("batch-b", -1, new_batch("b", rows=2000))
        assert "disk I/O error" in str(store.commit_error)  # what /health shows
    finally:
        await store.close()


async def test_a_reader_given_back_goes_to_whoever_waited_first(store_path: Path) -> None:
    store = EventStore(store_path, readers=1)
    await store.open()
    reads = 0

    async def hog() -> None:  # a follower that reads again as soon as it has read
        nonlocal reads
        while reads < 200:
            await store.select("SELECT 1", ())
            reads += 1

    try:
        hogging = asyncio.create_task(hog())
        await asyncio.sleep(0)  # the hog has the one reader
        await store.select("SELECT 2", ())
        reads_before_mine = reads
        await hogging
    finally:
        await store.close()

    assert reads_before_mine <= 2


async def test_a_read_asked_first_goes_ahead_of_the_reads_waiting(store_path: Path) -> None:
    store = EventStore(store_path, readers=1)
    await store.open()
    done: list[str] = []

    async def read(name: str, first: bool = False) -> None:
        await store.select("SELECT ?", (name,), first=first)
        done.append(name)

    try:
        reads = [asyncio.create_task(read(f"user-{i}")) for i in range(5)]
        await asyncio.sleep(0)  # user-0 has the one reader; the other four wait
        reads.append(asyncio.create_task(read("health", first=True)))
        await asyncio.gather(*reads)
    finally:
        await store.close()

    assert done[:2] == ["user-0", "health"]
    assert sorted(done) == sorted(["health", *(f"user-{i}" for i in range(5))])


async def test_a_reader_handed_to_a_caller_cancelled_meanwhile_goes_to_the_next() -> None:
    readers, conn = _Readers(), cast(aiosqlite.Connection, object())
    readers.give(conn)
    lent = await readers.take()
    cancelled = asyncio.create_task(readers.take())
    next_one = asyncio.create_task(readers.take())
    await asyncio.sleep(0)  # both wait, in that order

    readers.give(lent)  # handed to the first waiter...
    cancelled.cancel()  # ...which is cancelled before it runs

    async with asyncio.timeout(1):
        assert await next_one is conn
    assert cancelled.cancelled()


async def test_a_caller_cancelled_while_waiting_for_a_reader_is_cancelled_and_loses_none() -> None:
    readers, conn = _Readers(), cast(aiosqlite.Connection, object())
    readers.give(conn)
    lent = await readers.take()
    waiting = asyncio.create_task(readers.take())
    await asyncio.sleep(0)

    waiting.cancel()  # its wait ends at once...
    readers.give(lent)  # ...and the reader comes back before the task runs again

    with pytest.raises(asyncio.CancelledError):
        await waiting
    async with asyncio.timeout(1):
        assert await readers.take() is conn


async def test_reopened_store_continues_the_log(store_path: Path) -> None:
    first = EventStore(store_path)
    await first.open()
    await first.append("batch-a", -1, new_batch("a"))
    await first.close()

    second = EventStore(store_path)
    await second.open()
    try:
        assert second.head.position == 1
        appended = await second.append("batch-a", 0, requested("a"))
    finally:
        await second.close()

    assert (appended[0].global_position, appended[0].stream_version) == (2, 1)


async def test_close_commits_the_queued_appends_first(store_path: Path) -> None:
    store = EventStore(store_path)
    await store.open()
    pending = [
        asyncio.create_task(store.append(f"batch-{i}", -1, new_batch(str(i)))) for i in range(5)
    ]
    await asyncio.sleep(0)  # let every task queue its append

    await store.close()

    assert sorted(t.result()[0].global_position for t in pending) == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="not open"):
        await store.append("batch-x", -1, new_batch("x"))


async def test_an_append_while_closing_is_refused_not_left_waiting(store_path: Path) -> None:
    store = EventStore(store_path)
    await store.open()
    queued = asyncio.create_task(store.append("batch-a", -1, new_batch("a")))
    await asyncio.sleep(0)
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)  # close waits for the queued append

    with pytest.raises(RuntimeError, match="not open"):
        await asyncio.wait_for(store.append("batch-b", -1, new_batch("b")), 2)
    await closing
    assert queued.result()[0].global_position == 1


async def one_reader_after_a_cancelled_read(store_path: Path) -> EventStore:
    """A store with one reader, whose last query's caller was cancelled mid-query (a
    websocket client gone), with three batches in the log."""
    store = EventStore(store_path, readers=1)
    await store.open()
    for i in range(3):
        await store.append(f"batch-{i}", -1, new_batch(str(i)))
    reading = asyncio.create_task(read_all(store))
    await asyncio.sleep(0)  # its query is in the reader's thread
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    return store


async def test_a_read_after_a_cancelled_read_sees_the_latest_commit(store_path: Path) -> None:
    store = await one_reader_after_a_cancelled_read(store_path)
    try:
        await store.append("batch-new", -1, new_batch("new"))

        assert [e.stream_id for e in await read_all(store, 3)] == ["batch-new"]
    finally:
        await store.close()


async def test_following_a_new_stream_after_a_cancelled_read_starts_at_its_first_event(
    store_path: Path,
) -> None:
    store = await one_reader_after_a_cancelled_read(store_path)
    try:
        await store.append("batch-a", -1, new_batch("a"))
        await store.append("batch-a", 0, requested("a"))
        async with contextlib.aclosing(store.follow("batch-a")) as events:
            first = await asyncio.wait_for(anext(events), 2)

        assert (first.stream_id, first.stream_version) == ("batch-a", 0)
    finally:
        await store.close()


@dataclass(frozen=True)
class NoteAdded(ev.Event):
    """A test event whose v1 payload called `text` `note`."""

    type_name = "NoteAdded"
    text: str


async def test_old_payloads_are_upcast_on_read_and_never_rewritten(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ev.EVENT_TYPES, "NoteAdded", NoteAdded)
    store = EventStore(store_path)
    await store.open()
    try:
        run_sql(
            store_path,
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, "
            "schema_version, data, metadata, recorded_at) "
            "VALUES ('e1', 'notes', 0, 'NoteAdded', 1, '{\"note\":\"hi\"}', '{}', 'then')",
        )
        monkeypatch.setattr(NoteAdded, "schema_version", 2)
        monkeypatch.setitem(ev.UPCASTERS, ("NoteAdded", 1), lambda p: {"text": p["note"]})

        (stored,) = await store.read_stream("notes")
    finally:
        await store.close()

    assert (stored.schema_version, stored.data) == (2, {"text": "hi"})
    assert stored.decode() == NoteAdded("hi")
    assert run_sql(store_path, "SELECT schema_version, data FROM events") == [(1, '{"note":"hi"}')]


async def test_the_writer_forgets_old_streams_versions_and_reads_them_again(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_store, "KNOWN_VERSIONS", 3)
    for name in "abcde":  # one entry per stream ever written: it grew without bound
        await store.append(f"batch-{name}", -1, new_batch(name))

    assert len(store._versions) <= 4
    stored = await store.append("batch-a", 0, requested("a"))  # read again, not guessed
    assert [e.stream_version for e in stored] == [1]
    with pytest.raises(ConcurrencyError):
        await store.append("batch-b", -1, requested("b"))


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[EventStore]:
    store = EventStore(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_a_log_behind_its_mark_has_lost_commits_until_the_loss_is_recorded(
    store_path: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.db"
    async with opened(store_path) as store:
        await store.append("batch-a", -1, new_batch("a"))
    shutil.copyfile(store_path, copy)
    async with opened(store_path) as store:
        assert store.lost is None
        await store.append("batch-a", 0, requested("a", 2))
    shutil.copyfile(copy, store_path)  # an older copy put in place

    async with opened(store_path) as store:
        assert store.lost == (1, 3)
        await store.append("batch-a", 0, requested("a", 2))  # back at 3: still lost
    async with opened(store_path) as store:
        assert store.lost == (3, 3)
        await store.loss_recorded()
    async with opened(store_path) as store:
        assert store.lost is None


def move(path: Path, to: Path) -> None:
    """Move the database file alone: its mark stays where it was."""
    to.parent.mkdir()
    path.rename(to)


async def test_a_new_database_at_the_path_or_a_copy_at_another_is_not_behind(
    store_path: Path, tmp_path: Path
) -> None:
    async with opened(store_path) as store:
        await store.append("batch-a", -1, new_batch("a") + requested("a", 2))
    moved = tmp_path / "elsewhere" / "events.db"
    move(store_path, moved)  # no mark beside it there, and a new database where it was

    async with opened(store_path) as store:
        assert store.lost is None
    async with opened(moved) as store:
        assert store.lost is None
