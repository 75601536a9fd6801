"""One process writes a database: a second service, or a repair under a running one, is refused."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp

from service.local_directory import RunningDirectory
from service.store.migrations import discover, migrate
from tests.support import PROJECT, SAMPLE_CSV, ServiceProcess, form


def command(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGS` on the database `db`."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={"PATH": "/usr/bin:/bin", "DATABASE_PATH": str(db)},
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_a_second_service_on_the_same_database_is_refused_until_the_first_dies(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    db = tmp_path / "one.db"
    first, second = ServiceProcess(db, directory.url), ServiceProcess(db, directory.url)
    async with aiohttp.ClientSession() as http:
        await first.start(http)
        try:
            second.spawn()
            assert second.process is not None
            assert second.process.wait(20) == 2
            said = second.log.read_text()
            assert f"the database {db} is in use by another process" in said
            assert "Traceback" not in said
            link = tmp_path / "link.db"  # the same database under another name
            link.symlink_to(db)
            third = ServiceProcess(link, directory.url)
            third.spawn()
            assert third.process is not None and third.process.wait(20) == 2

            replace = command(db, "rebuild", "--replace")
            assert replace.returncode == 2
            assert "is in use by another process" in replace.stderr
            compare = command(db, "rebuild")  # reading is fine while the service runs
            assert compare.returncode == 0, compare.stderr

            async with http.post(f"{first.url}/batch/upload-csv", data=form(SAMPLE_CSV)) as r:
                assert r.status == 202  # the first one never noticed
        finally:
            first.kill()  # SIGKILL: the kernel lets go of the lock with the process
        # A port of its own: the second's, free when it was picked seconds ago, was taken
        # by another test's process once (a CI run: "address already in use").
        after = ServiceProcess(db, directory.url)
        await after.start(http)
        await after.stop()


def test_audit_commands_name_a_missing_or_foreign_database(tmp_path: Path) -> None:
    missing, foreign = tmp_path / "missing.db", tmp_path / "notes.db"
    foreign.write_text("not a database\n")
    for args in (("events",), ("rebuild",)):
        gone = command(missing, *args)
        assert gone.returncode == 2 and f"no database at {missing}" in gone.stderr
        other = command(foreign, *args)
        assert other.returncode == 2 and f"{foreign} is not a service database" in other.stderr
    assert not missing.exists()  # looking did not create it
    older = tmp_path / "older.db"
    with contextlib.closing(sqlite3.connect(older)) as conn:
        migrate(conn, discover()[:2])  # as the service left it before migration 003
    stale = command(older, "rebuild")
    assert stale.returncode == 2
    assert f"{older} is at schema version 2, this code's is {len(discover())}" in stale.stderr
    assert "start the service on it once" in stale.stderr
    assert command(older, "events").returncode == 0  # the log itself reads the same
    wrong = command(foreign, "events", "--batch", "nonsense")
    assert wrong.returncode == 2 and "'nonsense' is not a batch id" in wrong.stderr
    unknown = command(older, "events", "--batch", "6653a903-5b6a-4a4e-9a8e-6d0c2c1f1e11")
    assert unknown.returncode == 2 and "the log holds no batch 6653a903-" in unknown.stderr


def test_audit_commands_read_a_database_whose_name_holds_uri_characters(tmp_path: Path) -> None:
    """The service takes any file name; `events` and `rebuild` open it through a URI, where
    ? # and % mean something: unquoted, they opened another file, or created one."""
    db = tmp_path / "hbp?mode=rw#1%41.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        migrate(conn, discover())
    before = sorted(tmp_path.iterdir())
    assert command(db, "events").returncode == 0
    assert command(db, "rebuild").returncode == 0
    assert sorted(tmp_path.iterdir()) == before  # no stray file beside it


def test_audit_commands_name_an_event_the_code_cannot_read_and_exit_2(tmp_path: Path) -> None:
    """A log that holds an event of a newer version (newer code that changed a payload
    without a migration, or a hand) cannot be replayed: that is not a log whose read models
    differ (exit 1), and is said without a traceback."""
    db = tmp_path / "newer.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        migrate(conn, discover())
        conn.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, "
            "schema_version, data, metadata, recorded_at) "
            "VALUES ('e0', 'batch-a', 0, 'BatchMerged', 1, '{}', '{}', 'later')"
        )

    for args in (("rebuild",), ("events",), ("events", "--json")):
        done = command(db, *args)

        assert done.returncode == 2, done.stderr
        assert f"error: database {db}: the log holds an event this code cannot read" in done.stderr
        assert "unknown event type 'BatchMerged'" in done.stderr
        assert "Traceback" not in done.stderr


def test_rebuild_names_a_database_sqlite_cannot_read_and_exits_2(tmp_path: Path) -> None:
    """A restored main file over a killed service's -wal reads at first and fails further in:
    `rebuild` is what an operator checks it with, so it must say so, not end in a traceback."""
    db = tmp_path / "restored.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        migrate(conn, discover())
    page = 4096
    with db.open("r+b") as f:  # the log's first pages read; the read models' do not
        f.seek(6 * page)
        f.write(b"\xab" * 8 * page)

    done = command(db, "rebuild")

    assert done.returncode == 2, done.stderr
    assert f"error: database {db}: database disk image is malformed" in done.stderr
    assert "Traceback" not in done.stderr
