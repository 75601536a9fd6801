"""Replay the whole log into fresh read models and compare them with the live ones."""

from __future__ import annotations

import itertools
import json
import operator
import sqlite3
import time
from dataclasses import dataclass

import orjson

from service.domain import batch as b
from service.domain.events import decode
from service.projections import batches
from service.store.event_store import CHECKPOINT, connect_writer
from service.store.migrations import migrate

TABLES = ("batches", "batch_rows", "projection_checkpoints")


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


def replay(conn: sqlite3.Connection, source: str = "main") -> int:
    """Fold every batch stream of `source`.events and write the read models it implies.

    Rebuild goes through the domain fold, the definition of a batch's state, rather than
    the incremental SQL projector; comparing the two checks the projector against it.
    """
    cur = conn.cursor()
    events = conn.execute(
        "SELECT stream_id, stream_version, event_type, schema_version, data, recorded_at, "
        f"global_position FROM {source}.events ORDER BY stream_id, stream_version"
    )
    count = last_position = 0
    for _, stream in itertools.groupby(events, key=operator.itemgetter(0)):
        rows = list(stream)
        history = [
            (decode(kind, schema, orjson.loads(data)), at)
            for _, _, kind, schema, data, at, _ in rows
        ]
        count += len(rows)
        *_, updated_at, position = rows[-1]
        last_position = max(last_position, position)
        batches.write_fold(cur, b.fold(history), updated_at, position)
    if count:
        cur.execute(
            "INSERT INTO projection_checkpoints (name, position) VALUES (?, ?)",
            (CHECKPOINT, last_position),
        )
    return count


def rebuild(path: str, busy_timeout_ms: int = 5000, replace: bool = False) -> RebuildReport:
    """Replay the log into in-memory read models, compare them with the live ones.

    With `replace`, differing live read models are emptied and replayed in one
    transaction, so readers see either the old rows or the new ones.
    """
    started = time.perf_counter()
    fresh = sqlite3.connect(":memory:", isolation_level=None)
    try:
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
        fresh.execute("BEGIN")
        count = replay(fresh, source="live")
        replayed = time.perf_counter() - started
        differences = {table: _difference(fresh, table) for table in TABLES}
        fresh.execute("COMMIT")
    finally:
        fresh.close()
    compared = time.perf_counter() - started - replayed
    replaced = replace and any(differences.values())
    if replaced:
        _replace(path, busy_timeout_ms)
    return RebuildReport(count, replayed, compared, differences, replaced)


def _difference(conn: sqlite3.Connection, table: str) -> int:
    """Rows present on one side only, counted both ways."""
    missing, extra = (
        conn.execute(
            f"SELECT COUNT(*) FROM (SELECT * FROM {a}.{table} EXCEPT SELECT * FROM {b}.{table})"
        ).fetchone()[0]
        for a, b in (("main", "live"), ("live", "main"))
    )
    return int(missing + extra)


def _replace(path: str, busy_timeout_ms: int) -> None:
    conn = connect_writer(path, busy_timeout_ms)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for table in reversed(TABLES):
            conn.execute(f"DELETE FROM {table}")
        replay(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    finally:
        conn.close()
