"""The service against the stand-in's own timing, not injected faults: its rate limiter (on
a short window) and creates that are stored after the client stopped waiting."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest
from rich.console import Console

from service import client
from service.client import follow
from service.domain import batch as b
from service.domain import events as ev
from service.local_directory import DirectoryOptions, RunningDirectory, run_directory
from service.processing.directory_client import DirectoryClient
from service.processing.pacing import Pauses, WindowPacer
from service.processing.sent_lately import sent_lately
from service.processing.upstream import UpstreamBatches
from service.settings import Settings
from service.store import event_store
from service.store.event_store import EventStore
from service.store.records import NewEvent
from tests.integration.conftest import batch_created, new_batch, requested
from tests.support import Service, csv_of, fast_settings, running_service

WINDOW = 3.0  # seconds of the stand-in's rate window, and of the service's pacing window


@pytest.fixture
async def limited() -> AsyncIterator[RunningDirectory]:
    """30 creates a WINDOW, as the directory allows 30 a minute."""
    async with run_directory(DirectoryOptions(create_delay=0.05, window_seconds=WINDOW)) as d:
        yield d


def paced(db: Path, directory: RunningDirectory, window: float = WINDOW) -> Settings:
    """Settings pacing creates to 30 a `window`, the stand-in's limit in WINDOW. The margin
    is a tenth of the window (the default is 0.5 s of a minute): the stand-in's window
    starts when the first create arrives, which on a loaded machine is tens of ms after
    ours, and ours must not open again before the stand-in's has ended."""
    return fast_settings(
        db,
        directory.url,
        creates_per_minute=30,
        rate_window_seconds=window,
        rate_window_margin=0.1 * window,
    )


async def retries(service: Service, batch_id: str) -> list[dict[str, Any]]:
    """The data of the batch's HospitalRetryScheduled events."""
    _, page = await service.get(f"/batch/{batch_id}/events?limit=1000")
    return [e["data"] for e in page["events"] if e["event_type"] == "HospitalRetryScheduled"]


async def until_processed(service: Service, batch_id: str, rows: int) -> None:
    while (await service.get(f"/batch/{batch_id}/progress"))[1]["processed_hospitals"] < rows:
        await asyncio.sleep(0.05)


async def test_a_paced_file_past_the_limit_completes_with_no_429(
    limited: RunningDirectory, tmp_path: Path
) -> None:
    settings = paced(tmp_path / "paced.db", limited)
    async with running_service(settings) as service:
        batch_id = (await service.upload(csv_of(65)))["batch_id"]  # three windows
        final = await service.wait_finished(batch_id, within=60)
        retried = await retries(service, batch_id)

    assert final["processing_status"] == "completed"
    assert retried == []
    hospitals = limited.standin.all_hospitals()
    assert limited.standin.request_counts["create"] == 65
    assert len(hospitals) == 65 and all(h["active"] for h in hospitals)


def held_for(progress: dict[str, Any], before: str) -> int:
    """The seconds a progress's current_message says the window holds the next creates,
    after what it says of the batch (`before`)."""
    message = progress["current_message"]
    pattern = re.escape(before) + r"; the directory's rate limit holds the next creates for (\d+) s"
    said = re.fullmatch(pattern, message)
    assert said is not None, message
    return int(said[1])


async def test_progress_says_when_the_rate_window_holds_the_next_creates_back(
    limited: RunningDirectory, tmp_path: Path
) -> None:
    settings = paced(tmp_path / "held.db", limited)
    async with running_service(settings) as service:
        batch_id = (await service.upload(csv_of(35)))["batch_id"]
        async with asyncio.timeout(10):
            await until_processed(service, batch_id, 30)  # the first window's worth
        _, held = await service.get(f"/batch/{batch_id}/progress")
        await service.wait_finished(batch_id, within=30)
        _, done = await service.get(f"/batch/{batch_id}/progress")

    assert 1 <= held_for(held, "Processing hospital 30/35") <= WINDOW * 1.1 + 1
    assert done["current_message"] == "Completed: 35 hospital(s) created and activated"


async def test_progress_of_a_batch_queued_behind_a_full_window_says_it_is_held(
    limited: RunningDirectory, tmp_path: Path
) -> None:
    settings = paced(tmp_path / "queued.db", limited)
    async with running_service(settings) as service:
        first = (await service.upload(csv_of(30)))["batch_id"]  # fills the window
        async with asyncio.timeout(10):
            await until_processed(service, first, 30)
        second = (await service.upload(csv_of(3)))["batch_id"]
        _, queued = await service.get(f"/batch/{second}/progress")
        await service.wait_finished(second, within=30)

    assert 1 <= held_for(queued, "Queued: 3 hospital(s) waiting to be created") <= WINDOW * 1.1 + 1


async def test_a_follower_is_told_when_the_rate_window_holds_the_next_creates_back(
    limited: RunningDirectory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(follow, "QUIET_SECONDS", 0.5)  # a window lasts WINDOW seconds
    csv_file = tmp_path / "held.csv"
    csv_file.write_text(csv_of(35))
    out = io.StringIO()
    settings = paced(tmp_path / "followed.db", limited)
    async with running_service(settings) as service:
        argv = ["upload", str(csv_file), "--url", service.url, "--follow"]
        status = await client.run(argv, out=Console(file=out, width=200), err=Console(stderr=True))

    assert status == 0
    lines = out.getvalue().splitlines()
    held = [line for line in lines if "rate limit holds the next creates" in line]
    assert held, lines
    assert all(" 30/35 done, " in line for line in held)  # said during the wait, not after it
    assert "completed: 35 created, 0 failed" in lines[-1]


async def test_progress_of_a_file_sent_within_one_window_does_not_say_it_is_held(
    limited: RunningDirectory, tmp_path: Path
) -> None:
    limited.standin.set_delay(1.0)
    settings = paced(tmp_path / "whole.db", limited)
    async with running_service(settings) as service:
        batch_id = (await service.upload(csv_of(30)))["batch_id"]
        async with asyncio.timeout(10):
            while limited.standin.request_counts["create"] < 30:  # the window is full
                await asyncio.sleep(0.02)
        _, sent = await service.get(f"/batch/{batch_id}/progress")
        await service.wait_finished(batch_id, within=30)

    assert re.fullmatch(r"Processing hospital \d+/30", sent["current_message"])


async def test_with_pacing_off_a_429_still_pauses_creates_for_a_window(
    limited: RunningDirectory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.processing.processor")
    settings = fast_settings(tmp_path / "unpaced.db", limited.url, rate_window_seconds=WINDOW)
    async with running_service(settings) as service:
        batch_id = (await service.upload(csv_of(40)))["batch_id"]  # 30 pass, then 429s
        final = await service.wait_finished(batch_id, within=60)
        retried = await retries(service, batch_id)

    assert final["processing_status"] == "completed"
    # One 429 at most per create in flight when the first came back; it was thousands.
    assert 0 < len(retried) <= settings.directory.concurrency
    assert len(limited.standin.all_hospitals()) == 40 and limited.standin.duplicates() == []
    # The operator hears of the pause once, not once per create the 429s came back for.
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    pauses = [m for level, m in said if level == "WARNING" and "with 429" in m]
    assert len(pauses) == 1 and "creates pause 3 s" in pauses[0]
    assert ("INFO", f"batch {batch_id} accepted: 40 rows of 'hospitals.csv'") in said
    done = f"batch {batch_id} completed: 40 created, 0 failed, 0 deleted of 40 rows"
    assert ("INFO", done) in said


async def test_429s_from_a_window_another_caller_used_are_waited_out_not_failed(
    limited: RunningDirectory, tmp_path: Path
) -> None:
    async with aiohttp.ClientSession(limited.url) as http:  # the same address, 25 of 30 used
        for i in range(25):
            async with http.post("/hospitals/", json={"name": f"Other {i}", "address": "x"}) as r:
                assert r.status == 200
    settings = paced(tmp_path / "shared.db", limited)
    async with running_service(settings) as service:
        batch_id = (await service.upload(csv_of(20)))["batch_id"]
        final = await service.wait_finished(batch_id, within=60)
        retried = await retries(service, batch_id)

    assert final["processing_status"] == "completed"
    assert {r["reason"] for r in retried} == {
        "rate_limited"
    }  # a 429 costs a row none of its attempts
    assert final["failed_hospitals"] == 0
    ours = [h for h in limited.standin.all_hospitals() if h["creation_batch_id"]]
    assert len(ours) == 20 and limited.standin.duplicates() == []


async def test_a_429_holds_the_next_create_back_a_whole_window(
    limited: RunningDirectory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = limited.standin
    standin.add_fault("create", "429", nth=[1])
    sent: list[float] = []
    receive = standin.receive

    def noting(endpoint: str) -> str | None:
        if endpoint == "create":
            sent.append(time.monotonic())
        return receive(endpoint)

    monkeypatch.setattr(standin, "receive", noting)
    settings = paced(tmp_path / "refused.db", limited)
    async with running_service(settings) as service:
        final = await service.wait_finished((await service.upload(csv_of(1)))["batch_id"])

    assert final["processing_status"] == "completed"
    assert len(sent) == 2
    assert sent[1] - sent[0] >= WINDOW * 0.9  # the window waited out, not sent again at once


async def test_a_stop_while_creates_wait_for_the_window_is_prompt(
    limited: RunningDirectory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = paced(tmp_path / "stop.db", limited, window=60.0)
    settings = settings.replace(app={"shutdown_timeout": 5.0})
    async with running_service(settings) as service:
        batch_id = (await service.upload(csv_of(45)))["batch_id"]
        await until_processed(service, batch_id, 30)
        stopping = time.monotonic()  # 15 rows wait about a minute for the next window
    took = time.monotonic() - stopping

    assert took < 2.0  # it waited out the whole shutdown timeout (5 s), then cut tasks off
    assert "cut off" not in caplog.text
    assert limited.standin.request_counts["create"] == 30


async def test_a_stop_while_an_activation_waits_for_the_window_is_prompt(
    limited: RunningDirectory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One call on upstream batches a minute: the second of the file's two waits for it.
    settings = fast_settings(
        tmp_path / "activation.db", limited.url, batch_calls_per_minute=1, rate_window_seconds=60
    )
    settings = settings.replace(app={"shutdown_timeout": 5.0})
    counts = limited.standin.request_counts
    async with running_service(settings) as service:
        batch_id = (await service.upload(csv_of(21)))["batch_id"]
        async with asyncio.timeout(10):
            while counts["batch_activate"] < 1:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        stopping = time.monotonic()
    took = time.monotonic() - stopping
    unpaced = settings.replace(directory={"batch_calls_per_minute": 0})
    async with running_service(unpaced) as service:
        final = await service.wait_finished(batch_id, within=15)

    assert took < 2.0  # it waited out the whole shutdown timeout (5 s), then cut tasks off
    assert "cut off" not in caplog.text
    assert final["processing_status"] == "completed" and final["batch_activated"]
    hospitals = limited.standin.all_hospitals()
    assert counts["create"] == 21 and len(hospitals) == 21
    assert all(h["active"] for h in hospitals)


async def test_a_restart_inside_a_window_does_not_send_into_what_it_already_used(
    limited: RunningDirectory, tmp_path: Path
) -> None:
    settings = paced(tmp_path / "restart.db", limited)
    async with running_service(settings) as service:
        first = (await service.upload(csv_of(35)))["batch_id"]
        await service.wait_finished(first, within=60)
    # Rows 31-35 got their intents in the first window and opened the second, whose
    # 5 creates the next start must count: 25 places are left in it, not 30.
    async with running_service(settings) as service:
        second = (await service.upload(csv_of(30, "Later")))["batch_id"]
        final = await service.wait_finished(second, within=60)
        retried = await retries(service, second)

    assert final["processing_status"] == "completed"
    assert "rate_limited" not in {r["reason"] for r in retried}
    assert limited.standin.request_counts["create"] == 65


def outcomes(count: int, reason: str = b.NOT_STORED) -> list[NewEvent]:
    """Outcomes of row 1's first `count` creates: by default sent, and not found by a check."""
    return [NewEvent(ev.HospitalRetryScheduled(1, n, reason, "")) for n in range(1, count + 1)]


class SetClock(datetime):
    """The event store's wall clock, `at` seconds from the real one."""

    at = 0.0

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> Self:
        return cls.fromtimestamp(time.time() + cls.at, tz)


async def wait_after_replaying(store: EventStore, log: list[tuple[float, list[NewEvent]]]) -> float:
    """Seconds a restart's pacer (30 a minute) holds creates back after a log of, oldest
    first, (`at` seconds from the real clock, the events recorded then)."""
    await store.append("batch-x", -1, new_batch("x"))
    for at, events in log:
        SetClock.at = at
        await store.append("batch-x", None, events)
    SetClock.at = 0.0
    pacer = WindowPacer(30, 60.0, 0.5)
    pacer.replay(await sent_lately(store, 2 * 60.5))
    return pacer.seconds_to_room()


async def test_a_restart_after_the_wall_clock_stepped_back_waits_one_window_not_the_step(
    limited: RunningDirectory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The log was written an hour ahead of the clock the next start reads (an NTP
    # correction between a crash and the restart): its creates were sent moments ago, not
    # an hour from now, and must not hold the next ones back for an hour.
    settings = paced(tmp_path / "stepped.db", limited)
    monkeypatch.setattr(event_store, "datetime", SetClock)
    monkeypatch.setattr(SetClock, "at", 3600.0)
    async with running_service(settings) as service:
        first = (await service.upload(csv_of(30)))["batch_id"]
        await service.wait_finished(first, within=10)
    monkeypatch.setattr(SetClock, "at", 0.0)
    async with running_service(settings) as service:
        second = (await service.upload(csv_of(5, "Later")))["batch_id"]
        final = await service.wait_finished(second, within=3 * WINDOW)
        retried = await retries(service, second)

    assert final["processing_status"] == "completed"
    assert "rate_limited" not in {r["reason"] for r in retried}
    assert limited.standin.request_counts["create"] == 35


async def test_a_log_recorded_ahead_of_the_clock_holds_a_restart_back_as_long_as_it_was_sent(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An hour ahead: a window's worth two and one minute before the crash, 20 got ready at it
    # (they take their places in the next window: 10 are left there).
    monkeypatch.setattr(event_store, "datetime", SetClock)
    counts = [(3600.0 - 120.0, 30), (3600.0 - 60.0, 30), (3600.0, 20)]
    log = [(at, requested("x", count) + outcomes(count)) for at, count in counts]

    assert 0.0 < await wait_after_replaying(store, log) <= 1.0


async def test_a_clock_stepped_back_while_creates_were_sent_holds_a_restart_back_two_windows(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 creates answered, then the clock stepped back an hour, then 5 more and the crash:
    # the 40 were sent before the 5, which bounds how long they can hold the restart back.
    monkeypatch.setattr(event_store, "datetime", SetClock)
    log = [(3600.0, requested("x", 40) + outcomes(40)), (-1.0, requested("x", 5) + outcomes(5))]

    assert 55.0 < await wait_after_replaying(store, log) <= 2 * 60.5


async def test_a_restart_dates_the_creates_it_replays_by_their_answers(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The directory opened windows at -70 and -9.5, 30 creates each, answered 3 s later; 13
    # rows of the second had got ready at -40 and waited for room. Dated by their intents,
    # they were counted in a window put at -14.5, which ended at 46: the restart sent a
    # window's worth at 46 into the directory's, open until 50.5, and all were refused.
    monkeypatch.setattr(event_store, "datetime", SetClock)
    log = [
        (-75.0, requested("x", 30)),
        (-67.0, outcomes(30)),
        (-40.0, requested("x", 13)),
        (-9.5, requested("x", 17)),
        (-6.5, outcomes(30) + requested("x", 13)),  # 13 got ready, then withdrawn at the stop
        (-5.0, outcomes(13, b.WITHDRAWN)),
    ]

    assert 50.5 < await wait_after_replaying(store, log) <= 54.0


async def test_creates_that_never_reached_the_directory_take_no_place_in_the_window(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The directory could not be connected to: 30 creates, each provably never sent, and
    # one that was. Counted as sent, the 30 held the restart back for the rest of a window.
    monkeypatch.setattr(event_store, "datetime", SetClock)
    log = [
        (-5.0, requested("x", 30) + outcomes(30, b.UNREACHABLE)),
        (-4.0, [NewEvent(ev.HospitalFailed(1, b.UNREACHABLE, "gave up", retryable=True))]),
    ]

    assert await wait_after_replaying(store, log) == 0.0


async def test_rows_withdrawn_at_a_stop_leave_their_places_in_the_window(
    limited: RunningDirectory, tmp_path: Path
) -> None:
    # A minute's window: counted as sent, the withdrawn rows would hold the restart back
    # for the rest of it. The creates in flight end within the stop's grace.
    limited.standin.set_delay(0.2)
    settings = paced(tmp_path / "withdrawn.db", limited, window=60.0)
    settings = settings.replace(app={"shutdown_timeout": 3.0})
    async with running_service(settings) as service:
        batch_id = (await service.upload(csv_of(30)))["batch_id"]
        async with asyncio.timeout(10):
            while limited.standin.request_counts["create"] < 20:
                await asyncio.sleep(0.02)
    # Stopped with 20 creates in flight: they end, and the rows got ready behind them are
    # withdrawn.
    async with running_service(settings) as service:
        final = await service.wait_finished(batch_id, within=15)
        retried = await retries(service, batch_id)

    assert final["processing_status"] == "completed"
    assert any(r["reason"] == "withdrawn" for r in retried)
    assert limited.standin.request_counts["create"] == 30


async def test_creates_stored_after_the_read_timeout_are_found_not_sent_again(
    tmp_path: Path,
) -> None:
    # Each create takes 1.5 s and the client waits 0.5 s: every answer is lost, and each
    # hospital is stored a second after. The check after settle_seconds finds them all.
    options = DirectoryOptions(create_delay=1.5, rate_limit=False)
    async with run_directory(options) as directory:
        settings = fast_settings(
            tmp_path / "late.db", directory.url, read_timeout=0.5, settle_seconds=2.0
        )
        async with running_service(settings) as service:
            batch_id = (await service.upload(csv_of(3)))["batch_id"]
            final = await service.wait_finished(batch_id, within=30)
        creates = directory.standin.request_counts["create"]
        stored = directory.standin.all_hospitals()

    assert final["processing_status"] == "completed"
    assert {h["status"] for h in final["hospitals"]} == {"created_and_activated"}
    assert creates == 3 and len(stored) == 3


async def test_calls_on_upstream_batches_keep_to_the_directory_s_limits(db_path: Path) -> None:
    # Past the directory's 50 calls a window on an endpoint, every refused call was tried
    # again at the same moment, until max_attempts refusals failed it: a start after a lost
    # log reads every unfinished upstream batch at once (their rows failed as unconfirmed),
    # and many batches finishing or rolled back together activate or delete theirs at once
    # ("Rate limit exceeded": 50 of 300 one-row batches rolled back together).
    window = 0.5
    options = DirectoryOptions(create_delay=0.0, window_seconds=window)
    async with run_directory(options) as directory:
        settings = paced(db_path, directory, window).directory
        settings = dataclasses.replace(settings, batch_calls_per_minute=50, max_attempts=2)
        states = [b.start(batch_created(str(uuid.uuid4()), rows=1)) for _ in range(100)]
        first = states[0].upstream[0].creation_batch_id
        counts = directory.standin.request_counts
        async with DirectoryClient.new_session(settings) as session:
            client = DirectoryClient(session, settings)
            assert (await client.create("General", "1 Main St", None, first)).ok
            upstream = UpstreamBatches(client, settings, Pauses())
            reads = await asyncio.gather(*(upstream.members(first) for _ in states))
            sent = [counts["batch_get"]]
            # Only the first has a hospital: the others' activations are answered 404.
            activations = await asyncio.gather(
                *(upstream._activate_one(s, s.upstream[0]) for s in states)
            )
            rollbacks = await asyncio.gather(*(upstream.delete(s) for s in states))
        sent += [counts["batch_activate"], counts["batch_delete"]]

    assert [r.outcome for r in reads if not r.ok] == []
    assert [a.error for a in activations if "Rate limit" in a.error] == []
    assert [f for f in rollbacks if not isinstance(f, ev.BatchRolledBack)] == []
    assert sent == [len(states)] * 3  # none refused, none sent twice


async def test_creates_that_never_reach_the_directory_are_not_paced_as_sent(
    tmp_path: Path,
) -> None:
    # The directory down, creates paced 30 a minute: each refused connection took a place in
    # the window though the directory saw nothing, so 45 rows of 3 attempts went out 30 a
    # minute and the batch took minutes to fail, its progress blaming the rate limit.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound and never listening: connections are refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        settings = fast_settings(
            tmp_path / "down.db", url, creates_per_minute=30, rate_window_seconds=60.0
        )
        settings = settings.replace(directory={"max_attempts": 3})
        async with running_service(settings) as service:
            batch_id = (await service.upload(csv_of(45)))["batch_id"]
            final = await service.wait_finished(batch_id, within=15)
            unreachable = [
                r for r in await retries(service, batch_id) if r["reason"] == "unreachable"
            ]

    assert (final["processing_status"], final["failed_hospitals"]) == ("failed", 45)
    assert len(unreachable) == 45 * 2  # every attempt but the last, each one sent at once
