"""The batch pipeline end to end: real service, real SQLite, the local directory on loopback."""

from __future__ import annotations

import asyncio
import gc
import itertools
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from service.app import YOUNG_COLLECTION_THRESHOLD
from service.domain import batch as b
from service.domain import csv_intake
from service.domain import events as ev
from service.local_directory import RunningDirectory
from service.processing import processor
from service.projections import queries
from service.projections.rebuild import rebuild
from service.store.event_store import EventStore
from service.store.records import EVENT_COLUMNS, NewEvent, StoredEvent, from_row
from service.web import presenters
from service.web.keys import PROCESSOR, STORE
from service.web.status_cache import StatusCache
from tests.support import (
    SAMPLE_CSV,
    Service,
    ServiceFactory,
    csv_of,
    fast_settings,
    fill_upstream_batch,
    form,
    keyed_batch,
    running_service,
    without_collections,
)


async def test_readme_sample_is_created_and_activated(
    service: Service, directory: RunningDirectory
) -> None:
    async with service.http.post(
        f"{service.url}/batch/upload-csv", data=form(SAMPLE_CSV)
    ) as response:
        body = await response.json()
        assert response.status == 202
        assert response.headers["Location"] == f"/batch/{body['batch_id']}/status"
    assert body["total_hospitals"] == 3
    assert body["status"] == "pending"
    assert body["message"] == "CSV upload initiated. Use batch_id to track progress."

    final = await service.wait_finished(body["batch_id"])

    assert final["processing_status"] == "completed"
    assert final["batch_activated"] is True
    assert final["processed_hospitals"] == 3 and final["failed_hospitals"] == 0
    assert [h["status"] for h in final["hospitals"]] == ["created_and_activated"] * 3
    assert final["hospitals"][2]["phone"] is None
    stored = directory.standin.hospitals_in_batch(body["batch_id"])
    assert sorted(h["id"] for h in stored) == sorted(h["hospital_id"] for h in final["hospitals"])
    assert all(h["active"] for h in stored)
    status, progress = await service.get(f"/batch/{body['batch_id']}/progress")
    assert status == 200
    assert progress == {
        "batch_id": body["batch_id"],
        "progress_percentage": 100.0,
        "processing_status": "completed",
        "processed_hospitals": 3,
        "total_hospitals": 3,
        "failed_hospitals": 0,
        "current_message": "Completed: 3 hospital(s) created and activated",
    }


async def test_a_status_body_names_its_charset_as_every_other_json_answer(
    service: Service,
) -> None:
    # /status, ?as_of and bulk's 200 (a /status body) said "application/json" alone, every
    # other JSON answer "application/json; charset=utf-8".
    batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
    await service.wait_finished(batch_id)
    said = {}
    for path in ("progress", "status", "status?as_of=0"):
        async with service.http.get(f"{service.url}/batch/{batch_id}/{path}") as answer:
            said[path] = (answer.status, answer.headers["Content-Type"])
    assert set(said.values()) == {(200, "application/json; charset=utf-8")}, said


async def test_status_of_a_batch_being_worked_on_is_checked_against_its_fold_not_read(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory.standin.set_delay(0.5)
    reads: list[str] = []
    read = queries.get_batch

    async def counted(store: EventStore, batch_id: str) -> dict[str, Any] | None:
        reads.append(batch_id)
        return await read(store, batch_id)

    monkeypatch.setattr(queries, "get_batch", counted)
    batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
    reads.clear()
    status, running = await service.get(f"/batch/{batch_id}/status")
    reads_while_running = list(reads)
    final = await service.wait_finished(batch_id)

    assert status == 200 and running["processing_status"] in ("pending", "processing")
    assert reads_while_running == []
    assert batch_id in reads  # once the batch is finished, its row is read again
    assert final["processing_status"] == "completed"


async def test_45_rows_use_three_upstream_batches(
    service: Service, directory: RunningDirectory
) -> None:
    accepted = await service.upload(csv_of(45))
    final = await service.wait_finished(accepted["batch_id"])

    assert final["processing_status"] == "completed"
    hospitals = directory.standin.all_hospitals()
    assert len(hospitals) == 45 and all(h["active"] for h in hospitals)
    sizes = sorted(
        len([h for h in hospitals if h["creation_batch_id"] == b])
        for b in {h["creation_batch_id"] for h in hospitals}
    )
    assert sizes == [5, 20, 20]
    assert directory.standin.duplicates() == []
    assert rebuild(service.db_path).equal


async def test_rows_refused_by_the_directory_leave_the_batch_partially_completed(
    service_factory: ServiceFactory, directory: RunningDirectory, db_path: Path
) -> None:
    key, batch_id = keyed_batch(db_path, "partial")
    await fill_upstream_batch(directory, batch_id, 19)
    async with service_factory(concurrency=1) as service:
        accepted = await service.upload(SAMPLE_CSV, headers={"Idempotency-Key": key})
        assert accepted["batch_id"] == batch_id
        final = await service.wait_finished(batch_id)

    assert final["processing_status"] == "partially_completed"
    assert final["batch_activated"] is False
    assert [h["status"] for h in final["hospitals"]] == ["created", "failed", "failed"]
    assert "Batch cannot exceed 20 hospitals" in final["hospitals"][1]["error_message"]
    assert final["failed_hospitals"] == 2 and final["processed_hospitals"] == 3
    assert not any(h["active"] for h in directory.standin.hospitals_in_batch(batch_id))


async def test_a_batch_whose_every_row_fails_is_failed(
    service_factory: ServiceFactory, directory: RunningDirectory, db_path: Path
) -> None:
    key, batch_id = keyed_batch(db_path, "full")
    await fill_upstream_batch(directory, batch_id, 20)
    async with service_factory() as service:
        await service.upload(SAMPLE_CSV, headers={"Idempotency-Key": key})
        final = await service.wait_finished(batch_id)
    assert final["processing_status"] == "failed"
    assert {h["status"] for h in final["hospitals"]} == {"failed"}
    assert final["batch_activated"] is False


async def test_429s_lose_no_row_and_send_no_extra_create(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    directory.standin.add_fault("create", "429", nth=[2, 5, 6])
    async with service_factory() as service:
        accepted = await service.upload(csv_of(10))
        final = await service.wait_finished(accepted["batch_id"])
    assert final["processing_status"] == "completed"
    assert len(directory.standin.all_hospitals()) == 10
    assert directory.standin.duplicates() == []
    assert directory.standin.request_counts["create"] == 13  # 10 rows + 3 refused


@pytest.mark.parametrize("kind", ["commit_drop", "commit_502", "commit_504"])
async def test_a_create_stored_but_not_confirmed_is_reconciled_without_a_duplicate(
    service: Service, directory: RunningDirectory, kind: str
) -> None:
    directory.standin.add_fault("create", kind, nth=[2])
    accepted = await service.upload(SAMPLE_CSV)
    final = await service.wait_finished(accepted["batch_id"])

    assert final["processing_status"] == "completed"
    assert len(directory.standin.all_hospitals()) == 3
    assert directory.standin.duplicates() == []
    assert directory.standin.request_counts["create"] == 3  # the unclear one was never re-sent
    _, page = await service.get(f"/batch/{accepted['batch_id']}/events?limit=100")
    reconciled = [
        e
        for e in page["events"]
        if e["event_type"] == "HospitalCreated" and e["data"]["reconciled"]
    ]
    assert len(reconciled) == 1


async def test_identical_rows_with_a_lost_answer_are_matched_as_a_multiset(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.add_fault("create", "commit_drop", nth=[1, 3])
    same = "name,address,phone\nTwin,1 Road,555\nTwin,1 Road,555\nTwin,1 Road,555\n"
    accepted = await service.upload(same)
    final = await service.wait_finished(accepted["batch_id"])
    ids = [h["hospital_id"] for h in final["hospitals"]]
    assert final["processing_status"] == "completed"
    assert len(set(ids)) == 3
    assert len(directory.standin.all_hospitals()) == 3


async def test_a_dropped_create_that_was_not_stored_is_sent_again(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    directory.standin.add_fault("create", "reset", nth=[1])
    async with service_factory() as service:
        accepted = await service.upload(SAMPLE_CSV)
        final = await service.wait_finished(accepted["batch_id"])
    assert final["processing_status"] == "completed"
    assert len(directory.standin.all_hospitals()) == 3
    assert directory.standin.request_counts["create"] == 4


async def test_ambiguous_activation_is_checked_not_repeated(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.add_fault("batch_activate", "commit_drop", nth=[1])
    accepted = await service.upload(SAMPLE_CSV)
    final = await service.wait_finished(accepted["batch_id"])
    assert final["processing_status"] == "completed"
    assert final["batch_activated"] is True
    assert directory.standin.request_counts["batch_activate"] == 1
    assert directory.standin.request_counts["batch_get"] >= 1


async def test_activation_refused_by_a_5xx_is_tried_again_when_nothing_is_active(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.add_fault("batch_activate", "503", nth=[1])
    accepted = await service.upload(SAMPLE_CSV)
    final = await service.wait_finished(accepted["batch_id"])
    assert final["processing_status"] == "completed"
    assert directory.standin.request_counts["batch_activate"] == 2


async def test_a_small_batch_is_not_starved_by_a_large_one(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    async with service_factory() as service:
        large = await service.upload(csv_of(200, "Large"))
        await asyncio.sleep(0.1)
        small = await service.upload(csv_of(5, "Small"))
        await service.wait_finished(small["batch_id"])
        _, large_progress = await service.get(f"/batch/{large['batch_id']}/progress")
        final = await service.wait_finished(large["batch_id"], within=30)
    # Served in turn, not after the large one: it finished with most of the large one to go
    # (a ratio of the two times failed on a loaded machine).
    assert large_progress["processing_status"] == "processing"
    assert large_progress["processed_hospitals"] < 100
    assert final["processing_status"] == "completed"


async def test_progress_of_a_running_batch_is_its_fold_and_equals_the_read_model(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory.standin.set_delay(1.0)
    batch_id = (await service.upload(csv_of(30)))["batch_id"]  # 20 in flight, then 10
    store, processor = service.app[STORE], service.app[PROCESSOR]
    async with asyncio.timeout(10):  # the fold takes in a commit just after the read model
        while (
            (batch := await queries.get_batch(store, batch_id)) is None
            or batch["created_rows"] < 20
            or (state := processor.live_state(batch_id)) is None
            or state.version != batch["stream_version"]
        ):
            await asyncio.sleep(0.05)
    reads: list[object] = []
    real = queries.get_batch

    async def counted(*args: Any) -> Any:
        reads.append(args)
        return await real(*args)

    monkeypatch.setattr(queries, "get_batch", counted)
    status, body = await service.get(f"/batch/{batch_id}/progress")

    assert status == 200 and reads == []  # answered without reading the database
    assert body == presenters.progress(batch)
    assert (body["processed_hospitals"], body["processing_status"]) == (20, "processing")
    await service.wait_finished(batch_id)
    await service.get(f"/batch/{batch_id}/progress")
    assert reads  # a finished batch is read from the read model


async def test_a_finished_batch_goes_from_memory_without_a_garbage_collection(
    service: Service,
) -> None:
    with without_collections():
        batch_id = (await service.upload(csv_of(30)))["batch_id"]
        state = service.app[PROCESSOR].live_state(batch_id)
        assert state is not None
        fold = weakref.ref(state)
        del state
        await service.wait_finished(batch_id)
        await asyncio.sleep(0)  # the last task's done callbacks

        assert fold() is None


async def test_start_up_leaves_its_heap_out_of_collections_and_collects_young_ones_less(
    service_factory: ServiceFactory,
) -> None:
    gc.unfreeze()  # an earlier test's service froze the heap and raised the threshold too
    gc.set_threshold(700, 10, 10)
    before = gc.get_freeze_count()
    async with service_factory():
        assert before == 0 and gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, 10, 10)


async def test_each_change_of_status_warms_the_status_body(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    warmed: list[tuple[str, str]] = []

    def warm(
        cache: StatusCache, store: EventStore, batch_id: str, batch: dict[str, Any] | None = None
    ) -> None:  # records only
        warmed.append((batch_id, batch["status"] if batch else "unknown"))

    monkeypatch.setattr(StatusCache, "warm", warm)
    batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
    await service.wait_finished(batch_id)

    assert warmed == [(batch_id, "processing"), (batch_id, "completed")]


def fold_from_file(db_path: str, batch_id: str) -> b.BatchState:
    """A stopped service's batch, folded from its database file."""
    conn = sqlite3.connect(db_path)
    history = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ? ORDER BY stream_version",
        (b.stream_id(batch_id),),
    ).fetchall()
    conn.close()
    return b.fold((e.decode(), e.recorded_at) for e in map(from_row, history))


async def second_wave_sent_and_the_rest_ready(
    service: Service, directory: RunningDirectory, batch_id: str
) -> None:
    """Wait (rather than sleep a guess) until the first 20 rows are created, the second 20
    are with the directory and rows 41-45 have their intents in the log, ready behind them."""
    async with asyncio.timeout(20):
        while (
            len(directory.standin.all_hospitals()) < 20
            or directory.standin.request_counts["create"] < 40
            or (state := service.app[PROCESSOR].live_state(batch_id)) is None
            or any(state.rows[n].attempts == 0 for n in range(41, 46))
        ):
            await asyncio.sleep(0.01)


def withdrawn_rows(state: b.BatchState) -> list[b.RowState]:
    """The rows whose last attempt got ready and was not sent."""
    return [r for r in state.rows.values() if r.reason == b.WITHDRAWN]


async def test_a_clean_stop_sends_nothing_new_and_leaves_no_row_to_check(
    directory: RunningDirectory, db_path: Path
) -> None:
    directory.standin.set_delay(0.5)
    # A grace long enough for the second 20 to be answered and recorded on a loaded machine.
    settings = fast_settings(db_path, directory.url).replace(app={"shutdown_timeout": 5.0})
    async with running_service(settings) as service:
        accepted = await service.upload(csv_of(45))
        await second_wave_sent_and_the_rest_ready(service, directory, accepted["batch_id"])
    state = fold_from_file(service.db_path, accepted["batch_id"])

    assert directory.standin.request_counts["create"] == 40
    assert len(directory.standin.all_hospitals()) == 40
    assert state.counts().created == 40
    assert state.to_reconcile() == []  # every intent has its outcome: nothing to look up
    withdrawn = withdrawn_rows(state)
    assert [r.row.row for r in withdrawn] == [41, 42, 43, 44, 45]
    assert {r.error for r in withdrawn} == {"not sent: the service is stopping"}
    assert all(r.failures == 0 for r in withdrawn)


async def test_a_stop_that_cuts_off_creates_withdraws_the_rows_got_ready_behind_them(
    directory: RunningDirectory, db_path: Path
) -> None:
    # A worker got its next row ready while its create was out; the stop cut that create off
    # after the grace, and the row behind it, never sent, stayed an intent: the next start
    # looked for it in the directory and counted a failed attempt against it.
    directory.standin.set_delay(3.0)  # past the grace of 0.5 s
    settings = fast_settings(db_path, directory.url, concurrency=2)
    async with running_service(settings) as service:
        batch_id = (await service.upload(csv_of(10)))["batch_id"]
        async with asyncio.timeout(5):
            while (
                directory.standin.request_counts["create"] < 2
                or (state := service.app[PROCESSOR].live_state(batch_id)) is None
                or sum(r.attempts > 0 for r in state.rows.values()) < 4
            ):
                await asyncio.sleep(0.01)
    state = fold_from_file(service.db_path, batch_id)
    withdrawn = withdrawn_rows(state)

    assert directory.standin.request_counts["create"] == 2
    assert len(state.to_reconcile()) == 2  # the two sent, and only they, are looked for
    assert len(withdrawn) == 2
    assert {r.error for r in withdrawn} == {"not sent: the service is stopping"}


@pytest.fixture
def most_rows_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker gets MOST_AHEAD rows ready ahead, whatever the creates' answer time."""
    monkeypatch.setattr(processor, "AHEAD_WAIT", 10.0)


@pytest.mark.usefixtures("most_rows_ahead")
async def test_a_clean_stop_withdraws_every_row_got_ready_ahead_of_a_quick_directory(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(0.01)
    async with service_factory() as service:
        accepted = await service.upload(csv_of(1000))
        await asyncio.sleep(0.3)
    state = fold_from_file(service.db_path, accepted["batch_id"])
    withdrawn = withdrawn_rows(state)

    assert state.to_reconcile() == []  # every intent has its outcome: nothing to look up
    assert len(directory.standin.all_hospitals()) == state.counts().created
    assert directory.standin.request_counts["create"] == state.counts().created
    assert len(withdrawn) > 20  # more than one row ahead per worker


def rows_sought() -> int:
    """Tasks of the pool looking for a row to get ready (each takes the next one queued)."""
    return sum(
        getattr(task.get_coro(), "__qualname__", "") == "Processor._next_ready"
        for task in asyncio.all_tasks()
    )


@pytest.mark.usefixtures("most_rows_ahead")
async def test_idle_workers_wait_for_one_row_each_so_a_new_batch_is_spread_over_them(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    # A worker with nothing to send that waits for 12 rows takes up to 12 of the next batch,
    # which it then sends one after another while other workers have none.
    directory.standin.set_delay(0.002)
    async with service_factory() as service:
        quick = (await service.upload(csv_of(200, "Quick")))["batch_id"]
        await service.wait_finished(quick)
        idle = rows_sought()
        directory.standin.set_delay(0.5)
        started = time.monotonic()
        slow = (await service.upload(csv_of(20, "Slow")))["batch_id"]
        final = await service.wait_finished(slow)
        took = time.monotonic() - started

    assert idle == 20  # one per worker: the rows ahead are sought while a create is out
    assert final["processing_status"] == "completed"
    assert took < 2.0  # one create, one activation: not creates queued behind each other


@pytest.mark.usefixtures("most_rows_ahead")
# Pacing off, a worker gets rows ready ahead; pacing on (with room enough not to wait for a
# window), one row ahead: either way a row of an upstream batch being checked waits aside.
@pytest.mark.parametrize("pacing", [{}, {"creates_per_minute": 6000}], ids=["ahead", "paced"])
async def test_a_row_waiting_for_a_reconciliation_holds_up_no_worker(
    service_factory: ServiceFactory, directory: RunningDirectory, pacing: dict[str, int]
) -> None:
    directory.standin.set_delay(0.005)
    directory.standin.add_fault("create", "502", nth=[1])  # batch C's first row: unclear
    async with service_factory(concurrency=1, settle_seconds=2.0, **pacing) as service:
        c = (await service.upload(csv_of(5, "C")))["batch_id"]
        a = (await service.upload(csv_of(2, "A")))["batch_id"]
        started = time.monotonic()
        await service.wait_finished(a)
        a_took = time.monotonic() - started
        final_c = await service.wait_finished(c)

    assert a_took < 1.5  # not after C's 2 s of settling: the one worker goes on with A
    assert final_c["processing_status"] == "completed"
    assert len(directory.standin.all_hospitals()) == 7 and not directory.standin.duplicates()


async def test_a_restart_mid_batch_finishes_it_without_duplicates(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(0.5)
    async with service_factory() as service:
        accepted = await service.upload(csv_of(45))
        async with asyncio.timeout(20):  # some rows created, others in flight when it stops
            while True:
                _, progress = await service.get(f"/batch/{accepted['batch_id']}/progress")
                if progress["processed_hospitals"]:
                    break
                await asyncio.sleep(0.02)
    assert progress["processing_status"] == "processing"
    assert 0 < progress["processed_hospitals"] < 45
    async with service_factory() as service:
        final = await service.wait_finished(accepted["batch_id"], within=30)
        assert rebuild(service.db_path).equal
    assert final["processing_status"] == "completed"
    assert len(directory.standin.all_hospitals()) == 45
    assert directory.standin.duplicates() == []


async def test_unknown_and_malformed_batch_ids(service: Service) -> None:
    unknown = str(uuid.uuid4())
    for path in ("progress", "status"):
        status, body = await service.get(f"/batch/{unknown}/{path}")
        assert status == 404
        assert body == {"detail": f"Batch with ID {unknown} not found"}
        status, body = await service.get(f"/batch/not-a-uuid/{path}")
        assert status == 422
        assert body["detail"][0]["loc"] == ["path", "batch_id"]


async def test_status_as_of_a_version_is_the_fold_of_that_prefix(service: Service) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    await service.wait_finished(accepted["batch_id"])
    batch_id = accepted["batch_id"]
    _, at_zero = await service.get(f"/batch/{batch_id}/status?as_of=0")
    assert at_zero["processing_status"] == "pending"
    assert {h["status"] for h in at_zero["hospitals"]} == {"pending"}
    _, page = await service.get(f"/batch/{batch_id}/events")
    last = page["events"][-1]["stream_version"]
    _, at_last = await service.get(f"/batch/{batch_id}/status?as_of={last}")
    _, now = await service.get(f"/batch/{batch_id}/status")
    assert at_last["hospitals"] == now["hospitals"]
    status, body = await service.get(f"/batch/{batch_id}/status?as_of={last + 5}")
    assert status == 422 and body["detail"][0]["loc"] == ["query", "as_of"]


async def test_status_as_of_folds_the_batch_off_the_event_loop(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    await service.wait_finished(accepted["batch_id"])
    folded_on: list[int] = []
    fold = b.fold

    def noting_the_thread(events: Any) -> b.BatchState:
        folded_on.append(threading.get_ident())
        return fold(events)

    monkeypatch.setattr(b, "fold", noting_the_thread)
    status, body = await service.get(f"/batch/{accepted['batch_id']}/status?as_of=0")

    assert status == 200 and body["processing_status"] == "pending"
    assert folded_on and threading.get_ident() not in folded_on


async def test_large_batch_readers_decode_and_encode_off_the_event_loop(
    service: Service, decoded_on: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 50,000-row batch's BatchCreated takes 0.3 s to decode: on the loop, /health waited
    # 0.7 s behind one ?as_of (also one past the last version, before its 422) and 1.7 s
    # behind one /events page holding six large batches' BatchCreated; results.csv took
    # 0.25 s, and eight at once held it 1.6 s.
    accepted = await service.upload(SAMPLE_CSV)
    batch_id = accepted["batch_id"]
    await service.wait_finished(batch_id)
    decoded_on.clear()  # from here on
    status, body = await service.get(f"/batch/{batch_id}/status?as_of=99")
    assert status == 422 and body["detail"][0]["loc"] == ["query", "as_of"]
    assert decoded_on == []
    status, body = await service.get(f"/batch/{batch_id}/status?as_of=1")
    assert status == 200 and body["version"] == 1
    status, page = await service.get(f"/batch/{batch_id}/events?after=-1&limit=2")
    assert status == 200 and [e["stream_version"] for e in page["events"]] == [0, 1]
    assert page["next_after"] == 1 and page["events"][0]["event_type"] == "BatchCreated"
    status, log = await service.get("/events?after=0&limit=2")
    assert status == 200 and log["events"] == page["events"] and log["next_after"] == 2
    assert decoded_on and threading.get_ident() not in decoded_on

    escaped_on: list[int] = []
    escaped = csv_intake.escaped

    def noting_where_escaped(value: Any) -> str:
        escaped_on.append(threading.get_ident())
        return escaped(value)

    monkeypatch.setattr(csv_intake, "escaped", noting_where_escaped)
    async with service.http.get(f"{service.url}/batch/{batch_id}/results.csv") as r:
        assert r.status == 200
        assert (await r.text()).startswith("row,name,address,phone,status,hospital_id,")
    assert escaped_on and threading.get_ident() not in escaped_on


def refuse_intents(
    service: Service, monkeypatch: pytest.MonkeyPatch, times: int, error: str
) -> list[float]:
    """Make the first `times` appends of a row's intent fail with `error`; when each did."""
    refused: list[float] = []
    append = service.app[STORE].append

    async def refusing(
        stream_id: str, expected: int | None, events: Sequence[NewEvent]
    ) -> list[StoredEvent]:
        if len(refused) < times and isinstance(events[0].event, ev.HospitalRequested):
            refused.append(time.monotonic())
            raise sqlite3.OperationalError(error)
        return await append(stream_id, expected, events)

    monkeypatch.setattr(service.app[STORE], "append", refusing)
    return refused


async def test_a_row_whose_intent_cannot_be_stored_comes_back_after_a_pause(
    service_factory: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with service_factory() as service:  # backoff_max is 0.2 s here
        refused = refuse_intents(service, monkeypatch, 3, "disk I/O error")
        final = await service.wait_finished((await service.upload(csv_of(1)))["batch_id"])

    assert final["processing_status"] == "completed"
    assert len(refused) == 3
    # Not again at once, the same fault striking each time: once each pause.
    assert all(later - earlier >= 0.15 for earlier, later in itertools.pairwise(refused))


async def test_a_fault_that_strikes_every_row_logs_its_traceback_once_a_minute(
    service_factory: ServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with service_factory() as service:  # backoff_max is 0.2 s here
        refused = refuse_intents(service, monkeypatch, 20, "database or disk is full")
        final = await service.wait_finished((await service.upload(csv_of(30)))["batch_id"])

    # A full disk logged a 40-line traceback per row and retry: 14 GB a day for one batch.
    logged = [r for r in caplog.records if r.exc_info and "preparing row" in r.getMessage()]
    assert final["processing_status"] == "completed" and len(refused) == 20
    assert len(logged) == 1


@pytest.mark.parametrize("path", ["/batch/upload-csv", "/batch/validate-csv"])
async def test_uploaded_files_are_parsed_off_the_event_loop_one_at_a_time(
    service: Service, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    parsed_on: list[int] = []
    parsing: set[int] = set()
    most_at_once = 0
    parse_upload = csv_intake.parse_upload

    def noting(*args: Any) -> csv_intake.ParsedCsv:
        nonlocal most_at_once
        parsed_on.append(threading.get_ident())
        parsing.add(threading.get_ident())
        most_at_once = max(most_at_once, len(parsing))
        time.sleep(0.1)  # a large file
        parsing.discard(threading.get_ident())
        return parse_upload(*args)

    async def post() -> int:
        async with service.http.post(service.url + path, data=form(SAMPLE_CSV)) as r:
            return r.status

    monkeypatch.setattr(csv_intake, "parse_upload", noting)
    statuses = await asyncio.gather(*(post() for _ in range(3)))

    assert set(statuses) <= {200, 202} and len(parsed_on) == 3
    assert threading.get_ident() not in parsed_on
    assert most_at_once == 1
