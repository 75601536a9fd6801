"""The SQLite event store: one writer task with group commit, pooled readers, live follow."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import sqlite3
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from service.settings import DatabaseSettings
from service.store.head_mark import HeadMark, Lost
from service.store.migrations import check_sqlite_version, migrate
from service.store.records import (
    EVENT_COLUMNS,
    ConcurrencyError,
    DuplicateEventError,
    NewEvent,
    StoredEvent,
    from_row,
)
from service.tasks import log_failure

log = logging.getLogger(__name__)

# Keeps read models in step: called in the append's transaction with its stored events.
Projector = Callable[[sqlite3.Cursor, Sequence[StoredEvent]], None]

MAX_GROUP = 256  # appends committed in one transaction at most
# Committed events kept in memory for followers that keep up (a commit adds tens); more
# only lengthened each full garbage collection.
RECENT_EVENTS = 4_096
READ_PAGE = 500
# While commits fail, how often an empty one checks whether they land again: else /health
# stayed 503 on an idle service long after the disk had room or the lock was let go.
COMMIT_RETRY_SECONDS = 1.0
NOT_OPEN = "the event store is not open"
KNOWN_VERSIONS = 10_000  # streams whose last version the writer keeps (a miss reads it)
# The WAL is cut back to this once a checkpoint starts it over. A reader that holds a
# snapshot (`events | less`) keeps every commit in the WAL meanwhile (3,000 rows: 109 MB);
# without a limit the file stayed at that peak until the service stopped.
WAL_SIZE_LIMIT = 16 * 1024 * 1024


class _AlreadyStored(Exception):
    """The append's event ids are in the log: answer with what was stored, write nothing."""


@dataclass
class _Append:
    stream_id: str
    expected_version: int | None
    events: Sequence[NewEvent]
    future: asyncio.Future[list[StoredEvent]] = field(repr=False)


class Head:
    """The log's last committed position, and a wake-up for whoever waits for it to move."""

    def __init__(self, position: int = 0) -> None:
        self.position = position
        self._moved = asyncio.Event()

    def advance(self, position: int) -> None:
        """Record a new head and wake every waiter (the wake-up carries no data)."""
        self.position = position
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def wait_past(self, position: int) -> None:
        """Return once the head is beyond `position`."""
        while self.position <= position:
            await self._moved.wait()


class _Readers:
    """The reader connections, lent in turn: a caller that gives one back and asks again at
    once queues behind those already waiting (an asyncio.Queue would hand it straight back,
    and a busy follower would starve every other read)."""

    def __init__(self) -> None:
        self._idle: list[aiosqlite.Connection] = []
        self._waiting: deque[asyncio.Future[aiosqlite.Connection]] = deque()

    async def take(self, first: bool = False) -> aiosqlite.Connection:
        """A connection; `first` queues ahead of the callers already waiting."""
        if self._idle and not self._waiting:
            return self._idle.pop()
        handed: asyncio.Future[aiosqlite.Connection] = asyncio.get_running_loop().create_future()
        if first:
            self._waiting.appendleft(handed)
        else:
            self._waiting.append(handed)
        try:
            return await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():  # handed over as it was cancelled
                self.give(handed.result())
            elif handed in self._waiting:  # give() may have passed it over already
                self._waiting.remove(handed)
            raise

    def give(self, conn: aiosqlite.Connection) -> None:
        while self._waiting:
            handed = self._waiting.popleft()
            if not handed.done():
                handed.set_result(conn)
                return
        self._idle.append(conn)


def connect_writer(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """The one connection that writes: WAL, synchronous=FULL, explicit transactions."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # the first read: a file that is no database
        # FULL: a COMMIT that returned survives power loss, which is what "appended" promises.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA journal_size_limit={int(WAL_SIZE_LIMIT)}")
    except BaseException:
        conn.close()
        raise
    return conn


def rewrite_header(cur: sqlite3.Connection | sqlite3.Cursor) -> None:
    """Write the database's first page again, unchanged, in the open transaction.

    A transaction that changes nothing writes nothing (SQLite skips an UPDATE to the value
    a row holds), so its COMMIT lands on a full disk or a read-only mount too."""
    (version,) = cur.execute("PRAGMA user_version").fetchone()
    cur.execute(f"PRAGMA user_version = {int(version)}")


def check_writable(conn: sqlite3.Connection) -> None:
    """Raise sqlite3.OperationalError if the database can be read but not written (a
    read-only file or mount): a service on it would start, then fail every append."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        rewrite_header(conn)
    finally:
        if conn.in_transaction:  # a full disk or an I/O error rolls back by itself
            conn.execute("ROLLBACK")


CHECKPOINT = "read_models"


def record_checkpoint(cur: sqlite3.Cursor) -> None:
    """Note the log position the read models reflect: the last event, as they are in step."""
    cur.execute(
        "INSERT INTO projection_checkpoints (name, position) "
        "SELECT ?, COALESCE(MAX(global_position), 0) FROM events WHERE true "
        "ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        (CHECKPOINT,),
    )


class EventStore:
    """Append-only log of events in streams, with read models kept by projectors."""

    def __init__(
        self,
        path: str | Path,
        projectors: Sequence[Projector] = (),
        busy_timeout_ms: int = DatabaseSettings.busy_timeout_ms,
        readers: int = 4,
    ) -> None:
        self.path = str(path)
        self.head = Head()
        self._projectors = tuple(projectors)
        self._busy_timeout_ms = busy_timeout_ms
        self._reader_count = readers
        self._queue: asyncio.Queue[_Append] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="event-writer")
        self._writer: sqlite3.Connection | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._readers = _Readers()
        self._all_readers: list[aiosqlite.Connection] = []
        self._recent: deque[StoredEvent] = deque(maxlen=RECENT_EVENTS)
        self._versions: dict[str, int] = {}  # last version of each stream written (writer thread)
        # Why the last group commit failed (a full disk, an I/O error, a lock held past
        # busy_timeout); None once a commit lands.
        self.commit_error: Exception | None = None
        self._mark: HeadMark | None = None
        self._marked = -1  # the position last marked beside the database (writer thread)
        # Set by open when the log ends before the position marked beside it: it lost
        # commits. The mark then says so until `loss_recorded`, so a start cut off before
        # the loss is recorded in the log finds it again, however far the log grew meanwhile.
        self.lost: Lost | None = None

    async def open(self) -> None:
        """Migrate the database, then start the writer and open the readers."""
        check_sqlite_version()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        try:
            self._writer = await loop.run_in_executor(self._executor, self._open_writer)
            for _ in range(self._reader_count):
                conn = await aiosqlite.connect(self.path)
                self._all_readers.append(conn)
                await conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
                await conn.execute("PRAGMA query_only=ON")
                self._readers.give(conn)
            self.head.advance(await self.last_position())
            assert self._mark is not None
            marked = await loop.run_in_executor(self._executor, self._mark.read)
            if marked is not None and (marked.lost or marked.position > self.head.position):
                self.lost = Lost(self.head.position, marked.position)
                await loop.run_in_executor(self._executor, self._mark.write, marked.position, True)
        except BaseException:  # leave no connection or thread behind
            await self.close()
            raise
        self._writer_task = asyncio.create_task(self._write_loop(), name="event-writer")
        self._writer_task.add_done_callback(log_failure)

    def _open_writer(self) -> sqlite3.Connection:
        conn = connect_writer(self.path, self._busy_timeout_ms)
        try:
            migrate(conn)
            check_writable(conn)
            (instance,) = conn.execute("SELECT idempotency_namespace FROM instance").fetchone()
        except BaseException:
            conn.close()
            raise
        self._mark = HeadMark(self.path, instance)
        return conn

    async def close(self) -> None:
        """Finish the queued appends, then close every connection."""
        if (writer_task := self._writer_task) is not None:
            # Appends from now on are refused: one queued after the join would never settle.
            self._writer_task = None
            joined = asyncio.ensure_future(self._queue.join())
            try:  # or until the writer fails: the appends it left queued are never done
                await asyncio.wait([joined, writer_task], return_when=asyncio.FIRST_COMPLETED)
            finally:
                joined.cancel()
            writer_task.cancel()
            await asyncio.wait([writer_task])  # a writer that failed has said why already
            while not self._queue.empty():  # left by a writer that failed
                _settle(self._queue.get_nowait().future, exception=RuntimeError(NOT_OPEN))
        for conn in self._all_readers:
            await conn.close()
        self._all_readers.clear()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.get_running_loop().run_in_executor(self._executor, writer.close)
        self._executor.shutdown(wait=True)
        if self._mark is not None:
            self._mark.close()

    @property
    def can_commit(self) -> bool:
        """False once the writer task has stopped, the store is closing, or the last group
        commit failed (until one lands again): no append can commit now."""
        return self._writer_running and self.commit_error is None

    @property
    def _writer_running(self) -> bool:
        return self._writer_task is not None and not self._writer_task.done()

    # Writing ---------------------------------------------------------------------------

    async def append(
        self, stream_id: str, expected_version: int | None, events: Sequence[NewEvent]
    ) -> list[StoredEvent]:
        """Append `events` to a stream and return them as stored, once committed.

        `expected_version` is the stream's last version (-1 for a new stream), or None to
        append at the end whatever it is. Re-appending stored event ids writes nothing and
        returns the stored events. A caller that is cancelled does not cancel the commit.
        """
        if not events:
            return []
        if not self._writer_running:  # a failed last commit does not stop this one trying
            raise RuntimeError(NOT_OPEN)
        future: asyncio.Future[list[StoredEvent]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Append(stream_id, expected_version, events, future))
        try:
            return await asyncio.shield(future)
        finally:
            # A refusal raised here holds this frame in its traceback, and the future holds
            # the refusal: a cycle that kept the caller's frame (an upload's file and rows)
            # until a full collection, which app.py makes rare.
            del future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(COMMIT_RETRY_SECONDS if self.commit_error else None):
                    group = [await self._queue.get()]
            except TimeoutError:  # commits failed, and none was asked since: try an empty one
                group = []
            while len(group) < MAX_GROUP and not self._queue.empty():
                group.append(self._queue.get_nowait())
            try:
                outcomes = await loop.run_in_executor(self._executor, self._commit, group)
            except Exception as exc:  # the COMMIT itself failed: nothing of the group stands
                log.exception("group commit of %d appends failed", len(group))
                outcomes = [exc] * len(group)
                self.commit_error = exc
            else:
                if self.commit_error is not None:
                    log.info("commits land again; they had failed with: %s", self.commit_error)
                self.commit_error = None
            # By position: a retry in the same group returns the events its twin just wrote.
            committed: dict[int, StoredEvent] = {}
            for item, outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    _settle(item.future, exception=outcome)
                else:
                    committed.update(
                        (e.global_position, e)
                        for e in outcome
                        if e.global_position > self.head.position
                    )
                    _settle(item.future, result=outcome)
                self._queue.task_done()
            if committed:
                self._recent.extend(committed[p] for p in sorted(committed))
                self.head.advance(max(committed))

    def _commit(self, group: list[_Append]) -> list[list[StoredEvent] | Exception]:
        """Run in the writer thread: one transaction, one savepoint per append."""
        assert self._writer is not None
        cur = self._writer.cursor()
        recorded_at = datetime.now(UTC).isoformat(timespec="microseconds")
        outcomes: list[list[StoredEvent] | Exception] = []
        if len(self._versions) > KNOWN_VERSIONS:  # bounded: else one entry per batch ever
            self._versions.clear()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if not group:  # the empty commit that tells whether commits land again
                rewrite_header(cur)
            for item in group:
                cur.execute("SAVEPOINT append")
                try:
                    outcomes.append(self._append_one(cur, item, recorded_at))
                except _AlreadyStored:
                    cur.execute("ROLLBACK TO append")
                    outcomes.append(self._stored(cur, item))
                except Exception as exc:  # this append only: its neighbours still commit
                    if not self._writer.in_transaction:  # SQLite undid it all (a full disk)
                        raise
                    cur.execute("ROLLBACK TO append")
                    # A refusal without its traceback, which holds this frame and so
                    # `outcomes`: it would keep the whole group in a cycle. Any other error
                    # is a real failure, logged with the caller's 500: it keeps where it was.
                    refusal = isinstance(exc, ConcurrencyError)
                    outcomes.append(exc.with_traceback(None) if refusal else exc)
                cur.execute("RELEASE append")
            if self._projectors:
                record_checkpoint(cur)
            cur.execute("COMMIT")
        except BaseException:
            self._versions.clear()
            if self._writer.in_transaction:
                self._writer.rollback()
            raise
        # Positions rise within an append: each one's last event is its highest.
        ends = (o[-1].global_position for o in outcomes if isinstance(o, list) and o)
        self._mark_head(max(ends, default=0))
        return outcomes

    def _mark_head(self, position: int) -> None:
        """Run in the writer thread, after a commit: mark `position` beside the database,
        unless a loss found at open is not recorded yet."""
        if self.lost is not None or position <= self._marked or self._mark is None:
            return
        try:
            self._mark.write(position)
        except OSError:  # the commit stands; a mark left older can only miss a loss
            log.exception("marking position %d beside the database failed", position)
            return
        self._marked = position

    async def loss_recorded(self) -> None:
        """The loss found at open is recorded where it counts: mark the log's head again."""
        self.lost = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._mark_head, self.head.position)

    def _stored(self, cur: sqlite3.Cursor, item: _Append) -> list[StoredEvent] | Exception:
        """What an append whose event ids are already in the log stored the first time."""
        ids = [e.event_id for e in item.events]
        marks = ",".join("?" * len(ids))
        rows = cur.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id IN ({marks}) "
            "ORDER BY global_position",
            ids,
        ).fetchall()
        if len(rows) != len(ids) or any(row[2] != item.stream_id for row in rows):
            return DuplicateEventError(f"some of the event ids {ids} are already stored")
        return [from_row(row) for row in rows]

    def _append_one(self, cur: sqlite3.Cursor, item: _Append, at: str) -> list[StoredEvent]:
        current = self._versions.get(item.stream_id)
        if current is None:
            (current,) = cur.execute(
                "SELECT COALESCE(MAX(stream_version), -1) FROM events WHERE stream_id = ?",
                (item.stream_id,),
            ).fetchone()
        if item.expected_version is not None and item.expected_version != current:
            if self._ids_known(cur, item):
                raise _AlreadyStored
            raise ConcurrencyError(item.stream_id, item.expected_version, current)
        result = []
        for offset, new in enumerate(item.events):
            payload = orjson.dumps(new.event.payload())
            version = current + 1 + offset
            try:
                cur.execute(
                    "INSERT INTO events (event_id, stream_id, stream_version, event_type, "
                    "schema_version, data, metadata, recorded_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        new.event_id,
                        item.stream_id,
                        version,
                        new.event.type_name,
                        new.event.schema_version,
                        payload.decode(),
                        orjson.dumps(new.metadata).decode(),
                        at,
                    ),
                )
            except sqlite3.IntegrityError:
                if self._ids_known(cur, item):
                    raise _AlreadyStored from None
                raise
            result.append(
                StoredEvent(
                    global_position=cur.lastrowid or 0,
                    event_id=new.event_id,
                    stream_id=item.stream_id,
                    stream_version=version,
                    event_type=new.event.type_name,
                    schema_version=new.event.schema_version,
                    data=orjson.loads(payload),  # as a read returns it: arrays, not tuples
                    metadata=new.metadata,
                    recorded_at=at,
                    event=new.event,
                )
            )
        for project in self._projectors:
            project(cur, result)
        self._versions[item.stream_id] = current + len(item.events)
        return result

    @staticmethod
    def _ids_known(cur: sqlite3.Cursor, item: _Append) -> bool:
        ids = [e.event_id for e in item.events]
        marks = ",".join("?" * len(ids))
        row = cur.execute(f"SELECT 1 FROM events WHERE event_id IN ({marks}) LIMIT 1", ids)
        return row.fetchone() is not None

    # Reading ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _reader(self, first: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """A reader from the pool. Each query is one call in its thread (execute_fetchall):
        a caller cancelled mid-query must not leave a half-read cursor behind, whose open
        read transaction would show the next caller an old snapshot."""
        conn = await self._readers.take(first)
        try:
            yield conn
        finally:
            self._readers.give(conn)

    async def read_stream(
        self, stream_id: str, after_version: int = -1, limit: int | None = None
    ) -> list[StoredEvent]:
        """A stream's events after `after_version`, in version order."""
        return [from_row(r) for r in await self.stream_rows(stream_id, after_version, limit)]

    async def stream_rows(
        self,
        stream_id: str,
        after_version: int = -1,
        limit: int | None = None,
        most_chars: int | None = None,
    ) -> list[tuple[Any, ...]]:
        """read_stream's rows (EVENT_COLUMNS) not yet decoded: from_row decodes each, and
        a 50,000-row batch's BatchCreated alone takes 0.3 s, so readers that may meet one
        decode off the event loop. With `most_chars`, see `_rows`."""
        return await self._rows(
            "stream_id = ? AND stream_version > ? ORDER BY stream_version",
            (stream_id, after_version, -1 if limit is None else limit),
            most_chars,
        )

    async def log_rows(
        self, after_position: int = 0, limit: int = READ_PAGE, most_chars: int | None = None
    ) -> list[tuple[Any, ...]]:
        """Events of every stream after `after_position`, in log order, not yet decoded (see
        stream_rows)."""
        return await self._rows(
            "global_position > ? ORDER BY global_position", (after_position, limit), most_chars
        )

    async def _rows(
        self, picks: str, params: tuple[Any, ...], most_chars: int | None
    ) -> list[tuple[Any, ...]]:
        """The events `picks` (a condition, then an ORDER BY) selects, up to the LIMIT its
        last parameter sets; with `most_chars`, only as many of them as fit in it with
        their data and metadata, and always the first.

        A page's size is otherwise its limit times the largest event: a page of ten 10 MiB
        uploads' BatchCreated events took 2.5 GB to answer. The sizes are read first, so
        what does not fit is never read into memory.
        """
        sql = f"FROM events WHERE {picks} LIMIT ?"
        async with self._reader() as conn:
            if most_chars is not None:
                sizes = await conn.execute_fetchall(
                    f"SELECT length(data) + length(metadata) {sql}", params
                )
                params = (*params[:-1], _fitting([size for (size,) in sizes], most_chars))
            return [
                tuple(r)
                for r in await conn.execute_fetchall(f"SELECT {EVENT_COLUMNS} {sql}", params)
            ]

    async def stream_version(self, stream_id: str) -> int:
        """The stream's last version, -1 when it does not exist."""
        rows = await self.select(
            "SELECT COALESCE(MAX(stream_version), -1) FROM events WHERE stream_id = ?",
            (stream_id,),
        )
        return int(rows[0][0])

    async def last_position(self) -> int:
        """The log's last committed position, from the database: between a commit and the
        head's advance on the loop, it is ahead of `head`."""
        rows = await self.select("SELECT COALESCE(MAX(global_position), 0) FROM events", ())
        return int(rows[0][0])

    async def select(
        self, sql: str, params: Sequence[Any], first: bool = False
    ) -> list[tuple[Any, ...]]:
        """Run a read-only query on a reader connection; rows as tuples. `first` takes the
        next free reader ahead of the reads already waiting (a health check)."""
        async with self._reader(first) as conn:
            return [tuple(r) for r in await conn.execute_fetchall(sql, params)]

    async def follow(
        self, stream_id: str, after_version: int = -1
    ) -> AsyncGenerator[StoredEvent, None]:
        """Yield a stream's events after `after_version`, then every later one as it commits,
        forever.

        Followers are served from the recent committed events kept in memory when they
        can be, from the database otherwise; the head is read before each catch-up, so a
        commit that lands during a read is never missed.
        """
        # Everything up to this head is covered by the reads below, which start later.
        position = self.head.position
        while page := await self.read_stream(stream_id, after_version, READ_PAGE):
            for event in page:
                yield event
            after_version = page[-1].stream_version
            position = max(position, page[-1].global_position)
        while True:
            head = self.head.position
            events = await self._after(position, stream_id)
            for event in events:
                position = event.global_position
                if event.stream_id == stream_id and event.stream_version > after_version:
                    after_version = event.stream_version
                    yield event
            if not events:
                await self.head.wait_past(max(head, position))

    async def _after(self, position: int, stream_id: str) -> list[StoredEvent]:
        recent = self._recent
        if recent and recent[0].global_position <= position + 1:
            start = bisect.bisect_right(recent, position, key=lambda e: e.global_position)
            return _islice(recent, start)
        rows = await self.select(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ? AND global_position > ? "
            "ORDER BY global_position LIMIT ?",
            (stream_id, position, READ_PAGE),
        )
        return [from_row(r) for r in rows]


def _fitting(sizes: list[int], most: int) -> int:
    """How many of the first `sizes` add up to `most` or less; at least one."""
    total = 0
    for n, size in enumerate(sizes):
        total += size
        if total > most:
            return max(n, 1)
    return len(sizes)


def _islice(items: deque[StoredEvent], start: int) -> list[StoredEvent]:
    return [items[i] for i in range(start, len(items))]


def _settle(
    future: asyncio.Future[list[StoredEvent]],
    result: list[StoredEvent] | None = None,
    exception: BaseException | None = None,
) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result or [])
