"""Migrations: applied once each, in order, recorded; newer schemas and old SQLite refused."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from service.domain import batch as b
from service.domain import events as ev
from service.store.event_store import EventStore
from service.store.migrations import (
    MIGRATIONS_DIR,
    Migration,
    MigrationError,
    check_sqlite_version,
    discover,
    migrate,
)

EXPECTED_TABLES = {"events", "batches", "batch_rows", "projection_checkpoints", "schema_migrations"}


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def names(conn: sqlite3.Connection, kind: str) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = ?", (kind,))
    return {name for (name,) in rows if not name.startswith("sqlite_")}


def recorded(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()


def test_fresh_database_gets_every_migration_recorded(conn: sqlite3.Connection) -> None:
    files = sorted(MIGRATIONS_DIR.glob("*.sql"))

    assert migrate(conn) == list(range(1, len(files) + 1))
    assert recorded(conn) == [(int(f.name[:3]), f.stem) for f in files]
    assert names(conn, "table") >= EXPECTED_TABLES
    assert names(conn, "trigger") >= {"events_no_update", "events_no_delete", "events_no_replace"}


def test_second_run_applies_nothing(conn: sqlite3.Connection) -> None:
    migrate(conn)
    before = recorded(conn)

    assert migrate(conn) == []
    assert recorded(conn) == before


async def test_store_migrates_on_open_and_again_finds_nothing_to_do(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    for _ in range(2):
        store = EventStore(path)
        await store.open()
        await store.close()

    conn = sqlite3.connect(path)
    try:
        assert [v for v, _ in recorded(conn)] == [m.version for m in discover()]
    finally:
        conn.close()


def test_a_rollback_refused_before_the_upgrade_is_found_in_the_log(
    conn: sqlite3.Connection,
) -> None:
    before = [m for m in discover() if m.version < 5]
    migrate(conn, before)
    for batch_id in ("refused", "rolled-back"):
        conn.execute(
            "INSERT INTO batches (batch_id, file_name, content_sha256, total_rows, status, "
            "stream_version, last_position, created_at, updated_at) "
            "VALUES (?, 'f.csv', '', 1, 'failed', 2, 3, 't', 't')",
            (batch_id,),
        )
    for n, (batch_id, event_type) in enumerate(
        [("refused", "BatchRollbackFailed"), ("rolled-back", "BatchRolledBack")]
    ):
        conn.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, "
            "schema_version, data, metadata, recorded_at) VALUES (?, ?, 2, ?, 1, '{}', '{}', 't')",
            (f"e{n}", f"batch-{batch_id}", event_type),
        )

    assert migrate(conn, [m for m in discover() if m.version <= 5]) == [5]
    refused = dict(conn.execute("SELECT batch_id, rollback_refused FROM batches"))
    assert refused == {"refused": 1, "rolled-back": 0}


ROWS = (ev.Row(1, "H1", "1 Main St", None, 2), ev.Row(2, "H2", "2 Main St", None, 3))
REFUSED_THEN_ASKED = [
    ev.BatchRollbackRequested(),
    ev.BatchRollbackFailed("HTTP 500"),
    ev.BatchRollbackRequested(),
]


@pytest.mark.parametrize(
    ("history", "old_status", "old_finished"),
    [
        # Every row created: the old rule read processing again once the rollback was asked
        # for again (here still under way at the upgrade), then finished it anew.
        (
            [ev.HospitalCreated(1, 11), ev.HospitalCreated(2, 12), *REFUSED_THEN_ASKED],
            "processing",
            None,
        ),
        (
            [
                ev.HospitalCreated(1, 11),
                ev.HospitalCreated(2, 12),
                *REFUSED_THEN_ASKED,
                ev.BatchRolledBack(2, ("u",)),
            ],
            "failed",
            "t6",
        ),
        # A failed row: the old rule read partially_completed, finished all along.
        (
            [
                ev.HospitalCreated(1, 11),
                ev.HospitalFailed(2, "rejected", "no", retryable=False),
                *REFUSED_THEN_ASKED,
            ],
            "partially_completed",
            "t2",
        ),
    ],
)
def test_the_upgrade_gives_a_refused_batch_the_status_and_end_its_log_gives(
    conn: sqlite3.Connection, history: list[ev.Event], old_status: str, old_finished: str | None
) -> None:
    migrate(conn, [m for m in discover() if m.version < 5])
    created = ev.BatchCreated("x", "f.csv", ROWS, (ev.UpstreamBatch("u", (1, 2)),), "")
    events = [(created, "t0"), *((e, f"t{n}") for n, e in enumerate(history, start=1))]
    for version, (event, at) in enumerate(events):
        conn.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, "
            "data, metadata, recorded_at) VALUES (?, 'batch-x', ?, ?, ?, ?, '{}', ?)",
            (
                f"e{version}",
                version,
                event.type_name,
                event.schema_version,
                orjson.dumps(event.payload()).decode(),
                at,
            ),
        )
    state = b.fold(events)
    conn.execute(  # the read model as the code before the upgrade left it
        "INSERT INTO batches (batch_id, file_name, content_sha256, total_rows, created_rows, "
        "failed_rows, deleted_rows, requested, activated, rollback_requested, status, "
        "stream_version, last_position, created_at, updated_at, finished_at) "
        "VALUES ('x', 'f.csv', '', 2, ?, ?, ?, 0, 0, 1, ?, ?, ?, 't0', 't', ?)",
        (*state.counts()[1:4], old_status, state.version, state.version + 1, old_finished),
    )

    assert migrate(conn, [m for m in discover() if m.version <= 5]) == [5]
    live = conn.execute("SELECT status, finished_at FROM batches").fetchone()
    assert live == (state.status, state.finished_at)


# Each event type's payload version and fields as of the newest migration, and those of the
# rows and upstream batches BatchCreated holds. Code refuses a database at a schema version
# newer than its own, yet would start on one that merely holds events it cannot read (a new
# type, or a new field its dataclass refuses) and fail on them later: a change to the
# catalogue comes with a migration, and this with it.
CATALOGUE = (
    7,
    {
        "BatchCreated": (
            1,
            (
                "batch_id",
                "file_name",
                "rows",
                "upstream_batches",
                "content_sha256",
                "idempotency_key",
            ),
        ),
        "HospitalRequested": (2, ("rows", "attempts")),
        "LogLossDetected": (1, ("rows", "attempts", "log_position", "committed_position")),
        "HospitalCreated": (1, ("row", "hospital_id", "reconciled", "created_at")),
        "HospitalFailed": (1, ("row", "reason", "message", "retryable")),
        "HospitalRetryScheduled": (1, ("row", "attempt", "reason", "message")),
        "BatchActivated": (1, ("activated_count", "upstream_batch_ids")),
        "BatchActivationFailed": (1, ("reason", "activated_upstream_batch_ids")),
        "BatchResumed": (1, ("rows",)),
        "BatchRollbackRequested": (1, ()),
        "BatchRollbackFailed": (1, ("reason", "deleted_upstream_batch_ids")),
        "BatchRolledBack": (1, ("deleted_count", "upstream_batch_ids")),
        "BatchCreated.rows[]": ("row", "name", "address", "phone", "line"),
        "BatchCreated.upstream_batches[]": ("creation_batch_id", "rows"),
    },
)


def test_a_change_to_the_event_catalogue_comes_with_a_migration() -> None:
    catalogue: dict[str, object] = {
        name: (cls.schema_version, tuple(f.name for f in dataclasses.fields(cls)))
        for name, cls in ev.EVENT_TYPES.items()
    }
    for name, part in (("rows", ev.Row), ("upstream_batches", ev.UpstreamBatch)):
        catalogue[f"BatchCreated.{name}[]"] = tuple(f.name for f in dataclasses.fields(part))

    assert (len(discover()), catalogue) == CATALOGUE


@pytest.mark.parametrize("ahead", [1, 92])
def test_database_newer_than_the_code_is_refused(conn: sqlite3.Connection, ahead: int) -> None:
    migrate(conn)
    version = len(discover()) + ahead  # the very next one too
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'future', 'later')", (version,))

    with pytest.raises(MigrationError, match="newer"):
        migrate(conn)


async def test_store_refuses_to_open_a_newer_database(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    conn.execute("INSERT INTO schema_migrations VALUES (99, '099_future', 'later')")
    conn.close()
    store = EventStore(path)

    with pytest.raises(MigrationError, match="newer"):
        await store.open()
    await store.close()  # safe after a failed open


def test_failing_migration_leaves_nothing_of_itself(conn: sqlite3.Connection) -> None:
    good = Migration(1, "001_good", "CREATE TABLE good (x);")
    bad = Migration(2, "002_bad", "CREATE TABLE half (x);\nINSERT INTO missing VALUES (1);")

    with pytest.raises(MigrationError, match="002_bad"):
        migrate(conn, [good, bad])

    assert recorded(conn) == [(1, "001_good")]
    assert "half" not in names(conn, "table")
    assert migrate(conn, [good]) == []


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        (["001_a.sql", "003_c.sql"], "without gaps"),
        (["001_a.sql", "2_b.sql"], "not NNN_name.sql"),
    ],
)
def test_discover_refuses_misnumbered_files(tmp_path: Path, files: list[str], problem: str) -> None:
    for name in files:
        (tmp_path / name).write_text("SELECT 1;", encoding="utf-8")

    with pytest.raises(MigrationError, match=problem):
        discover(tmp_path)


def test_old_sqlite_is_refused() -> None:
    with pytest.raises(MigrationError, match=r"3\.35\.0 or newer is required, found 3\.30\.0"):
        check_sqlite_version((3, 30, 0))


@pytest.mark.parametrize("version", [(3, 35, 0), (3, 45, 1), sqlite3.sqlite_version_info])
def test_recent_sqlite_is_accepted(version: tuple[int, int, int]) -> None:
    check_sqlite_version(version)
