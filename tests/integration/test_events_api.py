"""The audit log: paging a batch and the whole log, `as_of`, restarts, and `events` on the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from service import __main__ as service_main
from service.__main__ import main
from service.domain import batch as b
from service.domain import events as ev
from service.store.event_store import EventStore
from service.store.records import NewEvent, StoredEvent, from_row
from service.web import events as events_api
from service.web import presenters
from service.web.keys import CPU_WORK, STORE
from tests.integration.conftest import new_batch, requested
from tests.support import PROJECT, SAMPLE_CSV, Service, ServiceFactory, csv_of

FIELDS = {
    "global_position",
    "event_id",
    "stream_id",
    "stream_version",
    "event_type",
    "schema_version",
    "recorded_at",
    "data",
    "metadata",
}


async def pages(service: Service, path: str, limit: int) -> list[list[dict[str, Any]]]:
    """Every page of an events listing, following next_after to the empty page."""
    found: list[list[dict[str, Any]]] = []
    after = None
    while True:
        query = f"?limit={limit}" + ("" if after is None else f"&after={after}")
        status, body = await service.get(path + query)
        assert status == 200, body
        if not body["events"]:  # the end for now: the same place to ask again
            assert body["next_after"] == (-1 if after is None else after)
            return found
        found.append(body["events"])
        after = body["next_after"]


async def test_a_batch_pages_in_version_order(service: Service) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    batch_id = accepted["batch_id"]
    await service.wait_finished(batch_id)

    found = await pages(service, f"/batch/{batch_id}/events", limit=2)
    events = [e for page in found for e in page]

    assert all(len(page) == 2 for page in found[:-1])
    assert [e["stream_version"] for e in events] == list(range(len(events)))
    assert all(set(e) == FIELDS for e in events)
    assert {e["stream_id"] for e in events} == {b.stream_id(batch_id)}
    assert events[0]["event_type"] == "BatchCreated"
    assert events[0]["data"]["file_name"] == "hospitals.csv"
    assert events[0]["metadata"]["actor"] == "api"
    assert events[-1]["event_type"] == "BatchActivated"
    assert events[-1]["data"]["activated_count"] == 3  # as the directory answered
    assert [e["recorded_at"] for e in events] == sorted(e["recorded_at"] for e in events)
    assert all(e["schema_version"] >= 1 for e in events)


async def test_the_whole_log_pages_by_position_and_holds_every_batch(service: Service) -> None:
    first = await service.upload(SAMPLE_CSV)
    second = await service.upload(csv_of(4))
    await service.wait_finished(first["batch_id"])
    await service.wait_finished(second["batch_id"])

    everything = [e for page in await pages(service, "/events", limit=3) for e in page]
    positions = [e["global_position"] for e in everything]

    assert positions == list(range(1, len(everything) + 1))
    for accepted in (first, second):
        _, own = await service.get(f"/batch/{accepted['batch_id']}/events?limit=1000")
        mine = [e for e in everything if e["stream_id"] == b.stream_id(accepted["batch_id"])]
        assert mine == own["events"]
    _, tail = await service.get(f"/events?after={positions[-2]}")
    assert tail["events"] == everything[-1:]
    for path in ("/events?limit=1", f"/batch/{first['batch_id']}/events?limit=1"):
        async with service.http.get(service.url + path) as answer:  # as json_response said
            assert answer.headers["Content-Type"] == "application/json; charset=utf-8"


async def test_a_page_holds_events_up_to_its_size_in_characters_and_always_one(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counted in events alone, a page of large uploads' BatchCreated events took GBs.
    most = 2_000
    monkeypatch.setattr(events_api, "PAGE_CHARS", most)
    big = [await service.upload(csv_of(1, prefix="N" * 1_500)) for _ in range(2)]
    huge = await service.upload(csv_of(1, prefix="H" * 5_000))  # past it alone
    for accepted in (*big, huge):
        await service.wait_finished(accepted["batch_id"])
    everything = await service.app[STORE].log_rows(0, 1000)

    found = await pages(service, "/events", limit=1000)

    def size(event: dict[str, Any]) -> int:
        return len(json.dumps(event["data"])) + len(json.dumps(event["metadata"]))

    assert [e for page in found for e in page] == [from_row(r).to_json() for r in everything]
    assert len(found) > 3 and all(len(page) <= 1000 for page in found)
    for page in found:
        assert len(page) == 1 or sum(map(size, page)) <= most * 1.1, page
    created = [p for p in found if p[0]["event_type"] == "BatchCreated"]
    assert len(created) == 3  # each starts a page: two of them do not fit together
    stream = b.stream_id(huge["batch_id"])
    (first, *_), *_ = await pages(service, f"/batch/{huge['batch_id']}/events", limit=1000)
    assert (first["stream_id"], first["event_type"]) == (stream, "BatchCreated")


async def test_the_end_of_the_log_says_where_to_ask_for_what_comes_next(service: Service) -> None:
    # A client tailing the log passes next_after on: at the end, null sent it back to the
    # start of the log on its next read.
    first = await service.upload(SAMPLE_CSV)
    await service.wait_finished(first["batch_id"])
    read = [e for page in await pages(service, "/events", limit=1000) for e in page]
    status, end = await service.get(f"/events?after={read[-1]['global_position']}")
    assert status == 200 and end["events"] == []
    second = await service.upload(SAMPLE_CSV)
    await service.wait_finished(second["batch_id"])

    status, more = await service.get(f"/events?after={end['next_after']}&limit=1000")

    assert status == 200 and more["events"]
    assert more["events"][0]["global_position"] == read[-1]["global_position"] + 1
    assert {e["stream_id"] for e in more["events"]} == {b.stream_id(second["batch_id"])}


async def test_pages_are_the_same_after_a_restart(service_factory: ServiceFactory) -> None:
    async with service_factory() as service:
        accepted = await service.upload(SAMPLE_CSV)
        await service.wait_finished(accepted["batch_id"])
        before = await pages(service, "/events", limit=4)
        batch_before = await pages(service, f"/batch/{accepted['batch_id']}/events", limit=3)
    async with service_factory() as service:
        after = await pages(service, "/events", limit=4)
        batch_after = await pages(service, f"/batch/{accepted['batch_id']}/events", limit=3)

    assert after == before and batch_after == batch_before


async def test_as_of_equals_a_fold_of_the_first_events(service: Service) -> None:
    accepted = await service.upload(csv_of(4))
    batch_id = accepted["batch_id"]
    await service.wait_finished(batch_id)
    _, page = await service.get(f"/batch/{batch_id}/events?limit=1000")
    stored = [StoredEvent(**e) for e in page["events"]]

    for version in range(len(stored)):
        status, as_of = await service.get(f"/batch/{batch_id}/status?as_of={version}")
        state = b.fold((e.decode(), e.recorded_at) for e in stored[: version + 1])
        expected = presenters.status(
            *presenters.records_of(state), until=stored[version].recorded_at
        )
        assert status == 200
        assert as_of["version"] == version
        assert as_of == expected, version  # the time too: up to that version's last event
        started = datetime.fromisoformat(stored[0].recorded_at)
        then = datetime.fromisoformat(stored[version].recorded_at)
        assert as_of["processing_time_seconds"] == round((then - started).total_seconds(), 3)
    _, now = await service.get(f"/batch/{batch_id}/status")
    assert as_of == now


async def test_as_of_reads_the_stream_only_in_its_turn_off_the_loop(service: Service) -> None:
    # A large batch's undecoded events are tens of MB: reads holding them wait for the one
    # CPU-bound job at a time, rather than each holding its rows while it waits.
    accepted = await service.upload(SAMPLE_CSV)
    await service.wait_finished(accepted["batch_id"])
    async with service.app[CPU_WORK]:
        answer = asyncio.ensure_future(service.get(f"/batch/{accepted['batch_id']}/status?as_of=0"))
        await asyncio.sleep(0.3)
        assert not answer.done()
    status, body = await answer

    assert status == 200 and body["version"] == 0


async def test_refusals(service: Service) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    unknown = str(uuid.uuid4())
    cases = {
        f"/batch/{unknown}/events": 404,
        "/batch/not-a-uuid/events": 422,
        "/events?limit=0": 422,
        "/events?limit=1001": 422,
        "/events?after=x": 422,
        f"/batch/{unknown}/status?as_of=0": 404,
        f"/batch/{accepted['batch_id']}/status?as_of=-1": 422,
    }
    for path, expected in cases.items():
        status, body = await service.get(path)
        assert status == expected, (path, body)
        assert "detail" in body


async def test_the_events_command_prints_a_timeline_or_json_lines(
    service: Service, db_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    batch_id = accepted["batch_id"]
    await service.wait_finished(batch_id)
    _, page = await service.get(f"/batch/{batch_id}/events")
    monkeypatch.setenv("DATABASE_PATH", str(db_path))

    assert main(["events", "--batch", batch_id]) == 0
    timeline = capsys.readouterr().out.splitlines()
    assert main(["events", "--batch", batch_id, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert lines == page["events"]
    assert len(timeline) == len(page["events"])
    assert "BatchCreated" in timeline[0] and "file='hospitals.csv' rows=3" in timeline[0]
    assert all(f"v{e['stream_version']}" in line for e, line in zip(lines, timeline, strict=True))
    assert "BatchActivated" in timeline[-1]
    requested = [line.split("rows=")[1] for line in timeline if "HospitalRequested" in line]
    rows = sorted(int(n) for line in requested for n in line.split(" ")[0].split(","))
    assert rows == [1, 2, 3] and all("attempts=1" in line for line in requested)


async def test_the_events_command_pages_neither_skip_nor_repeat_an_event(
    db_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    store = EventStore(db_path)
    await store.open()
    try:
        await store.append(b.stream_id(other), -1, new_batch(other))
        await store.append(b.stream_id(mine), -1, new_batch(mine))
        for _ in range(10):  # the two streams interleaved: versions and positions part ways
            await store.append(b.stream_id(other), None, requested(other, 3))
            await store.append(b.stream_id(mine), None, requested(mine, 2))
    finally:
        await store.close()
    monkeypatch.setattr(service_main, "EVENTS_PAGE", 4)
    monkeypatch.setenv("DATABASE_PATH", str(db_path))

    def printed(*args: str) -> list[dict[str, Any]]:
        assert main(["events", "--json", *args]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert [e["stream_version"] for e in printed("--batch", mine)] == list(range(21))
    assert [e["stream_version"] for e in printed("--batch", mine, "--after", "6")] == list(
        range(7, 21)
    )
    assert [e["global_position"] for e in printed("--after", "9")] == list(range(10, 53))


async def test_the_events_timeline_shows_a_directory_s_control_characters_as_text(
    db_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = str(uuid.uuid4())
    said = "refused\x1b[2J by the directory\nforged  #99 line"  # a directory's (or proxy's) words
    store = EventStore(db_path)
    await store.open()
    try:
        await store.append(b.stream_id(batch_id), -1, new_batch(batch_id))
        await store.append(
            b.stream_id(batch_id),
            None,
            [*requested(batch_id), NewEvent(ev.HospitalFailed(1, "rejected", said, False))],
        )
    finally:
        await store.close()
    monkeypatch.setenv("DATABASE_PATH", str(db_path))

    assert main(["events", "--batch", batch_id]) == 0
    timeline = capsys.readouterr().out.splitlines()
    assert main(["events", "--batch", batch_id, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert len(timeline) == len(lines) == 3  # one line an event: none forged
    assert "\x1b" not in "".join(timeline)  # nothing for the terminal to act on
    assert "refused\\x1b[2J by the directory\\x0aforged" in timeline[-1]
    assert lines[-1]["data"]["message"] == said  # JSON lines keep the words as they are


async def a_long_log(db: Path) -> None:
    store = EventStore(db)
    await store.open()
    await store.append("batch-x", -1, new_batch("x") + requested("x", 3000))  # 300 KB of lines
    await store.close()


def events_command(db: Path, stderr: int) -> subprocess.Popen[bytes]:
    """`python -m service events` on `db` in a process of its own, its output in a pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "service", "events"],
        env={"PATH": "/usr/bin:/bin", "DATABASE_PATH": str(db)},
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=stderr,
    )


def test_the_events_command_piped_into_a_reader_that_leaves_ends_quietly(tmp_path: Path) -> None:
    db = tmp_path / "service.db"
    asyncio.run(a_long_log(db))
    with events_command(db, stderr=subprocess.PIPE) as events:
        assert events.stdout is not None and events.stderr is not None
        assert b"BatchCreated" in events.stdout.readline()
        events.stdout.close()  # as `head -1` does
        said = events.stderr.read().decode()
        events.wait(30)

    assert events.returncode == 128 + signal.SIGPIPE
    assert said == ""


def test_the_events_command_holds_no_snapshot_while_its_output_waits(tmp_path: Path) -> None:
    db = tmp_path / "service.db"
    asyncio.run(a_long_log(db))
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("CREATE TABLE scratch (x)")  # a commit in the WAL, for readers to see
        with events_command(db, stderr=subprocess.DEVNULL) as events:
            assert events.stdout is not None
            assert b"BatchCreated" in events.stdout.readline()
            time.sleep(0.3)  # the pipe fills and the command waits to write the rest
            other.execute("PRAGMA busy_timeout = 0")
            # The command, read a page at a time, holds no snapshot that would keep the WAL
            # from starting over (busy 1): piped into a pager, it kept every later commit.
            (busy, _, _) = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            lines = 1 + len(events.stdout.read().splitlines())
            events.wait(30)

    assert busy == 0
    assert (events.returncode, lines) == (0, 3001)
