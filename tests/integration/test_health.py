"""GET /health over real HTTP: what a healthy service reports, what it reports when the
directory is down (still 200), a dead worker or a stopped writer (503), and that it answers
ahead of a queue of user reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service import __version__
from service.local_directory import RunningDirectory
from service.store import event_store
from service.web.keys import CLIENT, STORE
from tests.support import (
    SAMPLE_CSV,
    Service,
    ServiceFactory,
    creates_entered,
    csv_of,
    fast_settings,
    form,
    running_service,
)

TOP_KEYS = {"status", "timestamp", "version", "uptime_seconds", "database", "workers", "directory"}
DATABASE_KEYS = {"status", "path", "batches", "log_position"}
WORKERS_KEYS = {"alive", "configured", "active_batches"}
DIRECTORY_KEYS = {
    "url",
    "reachable",
    "last_call_at",
    "last_success_at",
    "last_error",
    "creates_per_minute",
}
READERS = 4  # the store's reader pool (EventStore's default, which the app keeps)
SLOW_READ = (  # about 30 ms of SQLite work, in a reader's thread
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) "
    "SELECT COUNT(*) FROM c"
)

Health = tuple[int, dict[str, Any]]


async def health(service: Service) -> Health:
    status, body = await service.get("/health")
    assert isinstance(body, dict), body
    return status, body


async def health_until(
    service: Service, wanted: Callable[[Health], bool], within: float = 10.0
) -> Health:
    """Poll /health until `wanted(status, body)`; the last answer."""
    deadline = time.monotonic() + within
    while not wanted(answer := await health(service)):
        assert time.monotonic() < deadline, f"/health never got there: {answer}"
        await asyncio.sleep(0.02)
    return answer


def assert_shape(body: dict[str, Any]) -> None:
    """Exactly the documented keys, each of its type (whatever the service's state)."""
    assert set(body) == TOP_KEYS, body
    assert body["status"] in ("healthy", "unhealthy")
    assert isinstance(body["timestamp"], str) and isinstance(body["version"], str)
    assert isinstance(body["uptime_seconds"], float)
    database, workers, directory = body["database"], body["workers"], body["directory"]
    assert set(database) <= DATABASE_KEYS and {"status", "path", "log_position"} <= set(database)
    assert isinstance(database["status"], str) and isinstance(database["path"], str)
    assert type(database["log_position"]) is int
    if database["status"] in ("ok", "writer stopped"):
        assert set(database) == DATABASE_KEYS and type(database["batches"]) is int
    assert set(workers) == WORKERS_KEYS
    assert all(type(workers[k]) is int for k in WORKERS_KEYS), workers
    assert set(directory) == DIRECTORY_KEYS
    assert isinstance(directory["url"], str)
    assert directory["reachable"] in (None, True, False)
    for key in ("last_call_at", "last_success_at", "last_error"):
        assert directory[key] is None or isinstance(directory[key], str), directory
    assert type(directory["creates_per_minute"]) is int


def utc(iso: str) -> datetime:
    """An ISO timestamp that must carry the UTC offset."""
    at = datetime.fromisoformat(iso)
    assert at.utcoffset() == timedelta(0), iso
    return at


def last_position(db: Path) -> int:
    """The log's last position, read from the file behind the service's back."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (position,) = conn.execute(
            "SELECT COALESCE(MAX(global_position), 0) FROM events"
        ).fetchone()
    return int(position)


async def test_a_healthy_service_reports_its_log_workers_and_directory(
    service_factory: ServiceFactory,
    directory: RunningDirectory,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Neither the default concurrency (20) nor the test default pace (0): read from settings.
    concurrency, pace = 3, 600
    entered = creates_entered(directory, monkeypatch)
    started = time.monotonic()
    async with service_factory(concurrency=concurrency, creates_per_minute=pace) as service:
        asked = datetime.now(UTC)
        status, fresh = await health(service)
        answered = datetime.now(UTC)
        assert status == 200, fresh
        assert_shape(fresh)
        assert fresh["status"] == "healthy"
        assert fresh["version"] == __version__
        assert asked <= utc(fresh["timestamp"]) <= answered
        # Rounded to the millisecond, so up to half of one past the time it measures.
        assert 0 <= fresh["uptime_seconds"] <= time.monotonic() - started + 0.0005
        assert fresh["database"] == {
            "status": "ok",
            "path": str(db_path),
            "batches": 0,
            "log_position": 0,
        }
        assert fresh["workers"] == {
            "alive": concurrency,
            "configured": concurrency,
            "active_batches": 0,
        }
        assert fresh["directory"] == {  # no call made yet: nothing known
            "url": directory.url.rstrip("/"),
            "reachable": None,
            "last_call_at": None,
            "last_success_at": None,
            "last_error": None,
            "creates_per_minute": pace,
        }

        before_upload = datetime.now(UTC)
        batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
        async with asyncio.timeout(10):
            await entered.wait()  # a create holds a worker: the batch is under way
        status, working = await health(service)
        assert status == 200 and working["status"] == "healthy", working
        assert working["workers"]["active_batches"] == 1
        assert working["database"]["batches"] == 1
        assert working["database"]["log_position"] > 0

        await service.wait_finished(batch_id)
        status, after = await health(service)
        assert status == 200, after
        assert_shape(after)
        assert after["status"] == "healthy"
        assert after["database"]["batches"] == 1
        assert after["database"]["log_position"] == last_position(db_path)
        assert after["database"]["log_position"] > working["database"]["log_position"]
        assert after["workers"] == {
            "alive": concurrency,
            "configured": concurrency,
            "active_batches": 0,
        }
        reached = after["directory"]
        assert reached["reachable"] is True and reached["last_error"] is None, reached
        assert reached["last_success_at"] == reached["last_call_at"]
        assert before_upload <= utc(reached["last_success_at"]) <= datetime.now(UTC)
        assert reached["creates_per_minute"] == pace
        assert fresh["uptime_seconds"] < after["uptime_seconds"]
        assert after["uptime_seconds"] <= time.monotonic() - started + 0.0005  # rounded too


async def test_an_unreachable_directory_is_reported_while_health_stays_200(
    db_path: Path,
) -> None:
    """503 means the service cannot accept work (README, Endpoints). With the directory down
    it still can: uploads are stored and their creates retried, so /health stays 200 and
    only says what it saw of the directory."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound and never listening: connections are refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        async with running_service(fast_settings(db_path, url)) as service:
            await service.upload(csv_of(2))  # asserts the 202: work is still accepted
            status, body = await health_until(
                service, lambda answer: answer[1]["directory"]["last_call_at"] is not None
            )

            assert status == 200, body
            assert_shape(body)
            assert body["status"] == "healthy"
            assert body["database"]["status"] == "ok" and body["database"]["batches"] == 1
            directory = body["directory"]
            assert directory["url"] == url
            assert directory["reachable"] is False
            assert directory["last_success_at"] is None
            assert directory["last_error"] is not None
            assert "cannot connect" in directory["last_error"]
            utc(directory["last_call_at"])


async def test_a_worker_that_died_makes_health_503(
    service_factory: ServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with service_factory(concurrency=2) as service:

        def broken() -> float:
            raise RuntimeError("a bug in the directory client")

        # Called by a worker as it takes a row, outside any handler: the worker ends for real.
        monkeypatch.setattr(service.app[CLIENT], "idle_for", broken)
        await service.upload(csv_of(1))
        status, body = await health_until(service, lambda answer: answer[0] != 200)

        assert status == 503, body
        assert_shape(body)
        assert body["status"] == "unhealthy"
        assert body["workers"]["alive"] == 1
        assert body["workers"]["configured"] == 2
        assert body["database"]["status"] == "ok"  # the workers alone make it unhealthy
        assert any(
            r.levelno == logging.ERROR and "stopped on an error" in r.getMessage()
            for r in caplog.records
        )


async def test_a_stopped_writer_makes_health_503(service: Service) -> None:
    await service.wait_finished((await service.upload(SAMPLE_CSV))["batch_id"])
    store = service.app[STORE]
    writer = store._writer_task
    assert writer is not None
    writer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await writer

    status, body = await health(service)

    assert status == 503, body
    assert_shape(body)
    assert body["status"] == "unhealthy"
    assert body["database"] == {
        "status": "writer stopped",
        "path": service.db_path,
        "batches": 1,  # reads still work: only appends cannot commit
        "log_position": last_position(Path(service.db_path)),
    }
    assert body["workers"]["alive"] == body["workers"]["configured"]


async def test_a_commit_that_fails_makes_health_503_until_one_lands(
    directory: RunningDirectory,
    db_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A lock another program holds past busy_timeout fails every commit, as a full disk or an
    # I/O error does: uploads got 500 while /health said healthy.
    monkeypatch.setattr(event_store, "COMMIT_RETRY_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="service.store.event_store")
    settings = fast_settings(db_path, directory.url).replace(
        database={"path": str(db_path), "busy_timeout_ms": 100}
    )
    async with running_service(settings) as service:
        holder = sqlite3.connect(db_path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            for _ in range(2):
                async with service.http.post(
                    f"{service.url}/batch/upload-csv", data=form(SAMPLE_CSV)
                ) as refused:
                    assert refused.status == 500
            status, health = await service.get("/health")
            assert (status, health["status"]) == (503, "unhealthy")
            assert health["database"]["status"] == "cannot commit: database is locked"
        finally:
            holder.close()
        # With nothing asked of the log meanwhile: an idle service stayed 503 for good.
        status, health = await health_until(service, lambda answer: answer[0] != 503, within=3)
        assert (status, health["status"]) == (200, "healthy")
        await service.upload(SAMPLE_CSV)

    said = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    answered_500 = [m for name, _, m in said if name == "service.web.errors"]
    assert len(answered_500) == 1  # the second upload's traceback is held back a minute
    assert (
        "service.store.event_store",
        "INFO",
        "commits land again; they had failed with: database is locked",
    ) in said


async def test_a_database_error_makes_health_503(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(*args: object, **kwargs: object) -> list[tuple[Any, ...]]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(service.app[STORE], "select", failing)

    status, body = await health(service)

    assert status == 503, body
    assert_shape(body)
    assert body["status"] == "unhealthy"
    assert body["database"] == {
        "status": "error: disk I/O error",
        "path": service.db_path,
        "log_position": 0,
    }


async def test_health_is_answered_ahead_of_the_user_reads_waiting(service: Service) -> None:
    """Every reader busy and 20 more reads waiting for one: /health takes the next free
    reader, instead of answering only once most of the queue has been served."""
    store = service.app[STORE]
    finished = 0

    async def slow_read() -> None:
        nonlocal finished
        await store.select(SLOW_READ, ())
        finished += 1

    reads = [asyncio.create_task(slow_read()) for _ in range(READERS + 20)]
    try:
        await asyncio.sleep(0)  # READERS reads hold the readers; the others wait for one
        assert finished == 0
        status, body = await health(service)
        finished_when_answered = finished
        await asyncio.gather(*reads)
    finally:
        for read in reads:
            read.cancel()

    assert status == 200 and body["status"] == "healthy", body
    assert finished == len(reads)
    assert finished_when_answered < len(reads) // 2, (
        f"/health answered after {finished_when_answered} of {len(reads)} queued reads"
    )
