"""A log that lost commits (an older copy put in place): rows it reads as unsent may be in
the directory, and are looked for there before any is sent again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
from pathlib import Path

import pytest

from service.local_directory import RunningDirectory
from service.projections.rebuild import rebuild
from tests.support import ServiceFactory, csv_of

ROWS = 8


def last_position(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT MAX(global_position) FROM events").fetchone()[0])


def back_up(db: str, copy: Path) -> None:
    """SQLite's online backup of a running service's database."""
    with (
        contextlib.closing(sqlite3.connect(db)) as live,
        contextlib.closing(sqlite3.connect(copy)) as backup,
    ):
        live.backup(backup)


def put_in_place(copy: Path, db: Path) -> None:
    """A restore as the README says: the service stopped, -wal and -shm deleted, the copy in."""
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(copy, db)


async def batch_run_past_a_copy(
    service_factory: ServiceFactory, directory: RunningDirectory, copy: Path
) -> str:
    """A batch of ROWS rows that finishes after a copy of the database taken while its
    third row was being created; the batch's id."""
    directory.standin.set_delay(0.1)
    async with service_factory(concurrency=1) as service:
        batch_id: str = (await service.upload(csv_of(ROWS)))["batch_id"]
        async with asyncio.timeout(10):
            while len(directory.standin.all_hospitals()) < 2:
                await asyncio.sleep(0.005)
        back_up(service.db_path, copy)
        assert (await service.wait_finished(batch_id))["processing_status"] == "completed"
    return batch_id


async def test_an_older_copy_put_in_place_creates_no_row_twice(
    service_factory: ServiceFactory,
    directory: RunningDirectory,
    db_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    copy = tmp_path / "copy.db"
    batch_id = await batch_run_past_a_copy(service_factory, directory, copy)
    committed, copied = last_position(db_path), last_position(copy)
    put_in_place(copy, db_path)

    with caplog.at_level(logging.WARNING):
        async with service_factory() as service:
            final = await service.wait_finished(batch_id)
            assert rebuild(service.db_path).equal

    assert final["processing_status"] == "completed"
    assert len(directory.standin.all_hospitals()) == ROWS
    assert directory.standin.duplicates() == []
    assert copied < committed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"log ends at position {copied}" in w and f"committed up to {committed}" in w
        for w in warnings
    ), warnings


async def test_a_stop_before_the_rows_are_looked_for_leaves_them_to_look_for(
    service_factory: ServiceFactory,
    directory: RunningDirectory,
    db_path: Path,
    tmp_path: Path,
) -> None:
    """The doubt is in the log, not in memory: a start cut off before the look (here by a
    stop while the directory hangs) leaves the next start nothing to detect, only rows to
    look for."""
    copy = tmp_path / "copy.db"
    batch_id = await batch_run_past_a_copy(service_factory, directory, copy)
    put_in_place(copy, db_path)
    reads = directory.standin.request_counts["batch_get"]
    directory.standin.add_fault("batch_get", "hang")
    async with service_factory() as service:
        async with asyncio.timeout(10):
            while directory.standin.request_counts["batch_get"] == reads:
                await asyncio.sleep(0.005)
    directory.standin.clear_faults()

    async with service_factory() as service:
        final = await service.wait_finished(batch_id)

    assert final["processing_status"] == "completed"
    assert len(directory.standin.all_hospitals()) == ROWS
    assert directory.standin.duplicates() == []


async def test_a_restart_on_an_unchanged_log_reads_the_directory_no_more(
    service_factory: ServiceFactory,
    directory: RunningDirectory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory.standin.set_delay(0.1)
    async with service_factory(concurrency=1) as service:
        batch_id = (await service.upload(csv_of(ROWS)))["batch_id"]
        async with asyncio.timeout(10):
            while len(directory.standin.all_hospitals()) < 2:
                await asyncio.sleep(0.005)

    with caplog.at_level(logging.WARNING):
        async with service_factory() as service:
            final = await service.wait_finished(batch_id)

    assert final["processing_status"] == "completed"
    counts = directory.standin.request_counts
    assert counts["create"] == ROWS
    assert counts["batch_get"] == 1  # the activation's look at its upstream batch, no more
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
