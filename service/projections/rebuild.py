"""Replay the whole log into fresh read models and compare them with the live ones."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass

from service.projections import batches
from service.store.event_store import CHECKPOINT, connect_writer
from service.store.migrations import migrate
from service.store.records import EVENT_COLUMNS, from_row

TABLES = ("batches", "batch_rows", "projection_checkpoints")


@dataclass(frozen=True)
class RebuildReport:
    events: int
    seconds: float
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
                "events_per_second": rate,
                "equal_to_live": self.equal,
                "differing_rows": self.differences,
                "replaced": self.replaced,
            }
        )


def replay(conn: sqlite3.Connection, source: str = "main") -> int:
    """Apply every event of `source`.events to the read models of `conn`'s main schema."""
    cur = conn.cursor()
    count = 0
    rows = conn.execute(f"SELECT {EVENT_COLUMNS} FROM {source}.events ORDER BY global_position")
    for row in rows.fetchall():
        stored = from_row(row)
        batches.project(cur, stored, stored.decode())
        count += 1
    if count:
        cur.execute(
            "INSERT INTO projection_checkpoints (name, position) VALUES (?, ?)",
            (CHECKPOINT, stored.global_position),
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
        fresh.execute("ATTACH DATABASE ? AS live", (path,))
        fresh.execute(f"PRAGMA live.busy_timeout={int(busy_timeout_ms)}")
        fresh.execute("BEGIN")
        count = replay(fresh, source="live")
        differences = {table: _difference(fresh, table) for table in TABLES}
        fresh.execute("COMMIT")
    finally:
        fresh.close()
    seconds = time.perf_counter() - started
    replaced = replace and any(differences.values())
    if replaced:
        _replace(path, busy_timeout_ms)
    return RebuildReport(count, seconds, differences, replaced)


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
