"""Replay the whole log into fresh read models and compare them with the live ones."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import multiprocessing
import operator
import os
import sqlite3
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import orjson

from service.domain import batch as b
from service.domain.events import decode
from service.projections import batches
from service.settings import DatabaseSettings
from service.store.event_store import CHECKPOINT, connect_writer, record_checkpoint
from service.store.migrations import migrate

CHECKPOINTS = "projection_checkpoints"
BATCH_TABLES = ("batches", "batch_rows")  # compared share by share
TABLES = (*BATCH_TABLES, CHECKPOINTS)
PARALLEL_FROM = 200_000  # events per process: below this, starting one costs more than it saves
LAST = "\U0010ffff"  # sorts after every stream id


@dataclass(frozen=True)
class RebuildReport:
    events: int
    seconds: float  # replaying the log into fresh read models
    compare_seconds: float  # comparing them with the live ones
    differences: dict[str, int]
    replaced: bool = False

    @property
    def equal(self) -> bool:
        return not any(self.differences.values())

    def to_json(self) -> str:
        """One line for the `rebuild` command's output."""
        rate = round(self.events / self.seconds) if self.seconds else None
        return json.dumps(
            {
                "events_replayed": self.events,
                "seconds": round(self.seconds, 3),
                "compare_seconds": round(self.compare_seconds, 3),
                "events_per_second": rate,
                "equal_to_live": self.equal,
                "differing_rows": self.differences,
                "replaced": self.replaced,
            }
        )


def replay(
    conn: sqlite3.Connection, source: str = "main", streams: tuple[str, str] | None = None
) -> int:
    """Fold every batch stream of `source`.events, or those in `streams` [first, next), and
    write the read models they imply; return the events replayed.

    Rebuild goes through the domain fold, the definition of a batch's state, rather than
    the incremental SQL projector; comparing the two checks the projector against it.
    """
    cur = conn.cursor()
    first, after = streams or ("", LAST)
    events = conn.execute(
        "SELECT stream_id, stream_version, event_type, schema_version, data, recorded_at, "
        f"global_position FROM {source}.events WHERE stream_id >= ? AND stream_id < ? "
        "ORDER BY stream_id, stream_version",
        (first, after),
    )
    count = 0
    for _, stream in itertools.groupby(events, key=operator.itemgetter(0)):
        rows = list(stream)
        history = [
            (decode(kind, schema, orjson.loads(data)), at)
            for _, _, kind, schema, data, at, _ in rows
        ]
        count += len(rows)
        *_, updated_at, position = rows[-1]
        batches.write_fold(cur, b.fold(history), updated_at, position)
    return count


def rebuild(
    path: str,
    busy_timeout_ms: int = DatabaseSettings.busy_timeout_ms,
    replace: bool = False,
    workers: int | None = None,
) -> RebuildReport:
    """Replay the log into in-memory read models, compare them with the live ones.

    A large log is split by stream among `workers` processes (by default one per 200,000
    events, at most one per CPU), each replaying and comparing its share in its own
    snapshot. With `replace`, when they differ, every live read model is emptied and
    replayed in one transaction, so readers see either the old rows or the new ones.
    """
    started = time.monotonic()
    shares = _shares(path, busy_timeout_ms, workers)
    if len(shares) == 1:
        parts = [_check(path, busy_timeout_ms, shares[0])]
    else:
        spawn = multiprocessing.get_context("spawn")  # no fork of a threaded caller
        with ProcessPoolExecutor(len(shares), mp_context=spawn) as pool:
            parts = list(pool.map(functools.partial(_check, path, busy_timeout_ms), shares))
    replayed = max(p.replayed_at for p in parts) - started
    differences = {table: sum(p.differences[table] for p in parts) for table in BATCH_TABLES}
    differences[CHECKPOINTS] = _checkpoint_difference(path, busy_timeout_ms)
    compared = time.monotonic() - started - replayed
    replaced = replace and any(differences.values())
    if replaced:
        _replace(path, busy_timeout_ms)
    count = sum(p.events for p in parts)
    return RebuildReport(count, replayed, compared, differences, replaced)


def _shares(path: str, busy_timeout_ms: int, workers: int | None) -> list[tuple[str, str]]:
    """Stream-id ranges [first, next) that cover every stream, one per worker; by default
    one per CPU, each with PARALLEL_FROM events at least."""
    with contextlib.closing(_open_live(path, busy_timeout_ms)) as conn:
        if workers is None:
            workers = max(1, min(_cpus(), _last_position(conn) // PARALLEL_FROM))
        streams = [
            s for (s,) in conn.execute("SELECT DISTINCT stream_id FROM events ORDER BY stream_id")
        ]
    cuts = {streams[len(streams) * i // workers] for i in range(1, workers) if streams}
    return list(itertools.pairwise(["", *sorted(cuts), LAST]))


def _cpus() -> int:
    """The CPUs this process may run on (its affinity, where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _last_position(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(global_position), 0) FROM events").fetchone()[0])


@dataclass(frozen=True)
class _Part:
    events: int
    replayed_at: float  # time.monotonic(), the same clock in every process
    differences: dict[str, int]


def _check(path: str, busy_timeout_ms: int, streams: tuple[str, str]) -> _Part:
    """Replay one share of the streams into a scratch database and compare it with live."""
    with contextlib.closing(sqlite3.connect(":memory:", isolation_level=None)) as fresh:
        migrate(fresh)
        # A scratch copy, only ever compared whole: it needs no rollback journal and no
        # index beyond its tables' keys.
        fresh.execute("PRAGMA main.journal_mode=OFF")
        for (index,) in fresh.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ).fetchall():
            fresh.execute(f"DROP INDEX {index}")
        fresh.execute("ATTACH DATABASE ? AS live", (path,))
        fresh.execute(f"PRAGMA live.busy_timeout={int(busy_timeout_ms)}")
        fresh.execute("BEGIN")  # one snapshot of the live log and its read models
        count = replay(fresh, "live", streams)
        replayed_at = time.monotonic()
        differences = {table: _difference(fresh, table, streams) for table in BATCH_TABLES}
        fresh.execute("COMMIT")
    return _Part(count, replayed_at, differences)


def _difference(conn: sqlite3.Connection, table: str, streams: tuple[str, str]) -> int:
    """Rows of a share present on one side only, counted both ways."""
    first, after = (s.removeprefix(b.STREAM_PREFIX) for s in streams)
    live = f"SELECT * FROM live.{table} WHERE batch_id >= ? AND batch_id < ?"
    missing, extra = (
        conn.execute(f"SELECT COUNT(*) FROM ({query})", (first, after)).fetchone()[0]
        for query in (
            f"SELECT * FROM main.{table} EXCEPT {live}",
            f"{live} EXCEPT SELECT * FROM main.{table}",
        )
    )
    return int(missing + extra)


def _checkpoint_difference(path: str, busy_timeout_ms: int) -> int:
    """Checkpoint rows on one side only: replay leaves one, at the log's last position."""
    with contextlib.closing(_open_live(path, busy_timeout_ms)) as conn:
        conn.execute("BEGIN")  # the checkpoint and the log in one snapshot
        live = set(conn.execute(f"SELECT name, position FROM {CHECKPOINTS}").fetchall())
        last = _last_position(conn)
        conn.execute("COMMIT")
    return len(live ^ ({(CHECKPOINT, last)} if last else set()))


def _open_live(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    conn.execute("PRAGMA query_only=ON")
    return conn


def _replace(path: str, busy_timeout_ms: int) -> None:
    conn = connect_writer(path, busy_timeout_ms)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for table in reversed(TABLES):
            conn.execute(f"DELETE FROM {table}")
        if replay(conn):
            record_checkpoint(conn.cursor())
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    finally:
        conn.close()
