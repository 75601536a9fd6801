"""Resume and rollback end to end: real service, real SQLite, the local directory on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest

from service.domain.batch import ROLLBACK_ASKED_MESSAGE, ROLLED_BACK_MESSAGE
from service.local_directory import RunningDirectory
from service.local_directory.storage import Hospital, NewHospital
from service.projections.rebuild import rebuild
from service.store.records import NewEvent, StoredEvent
from service.web.keys import PROCESSOR, SETTINGS, STORE
from tests.integration.conftest import hold_after_commit
from tests.support import (
    SAMPLE_CSV,
    Service,
    ServiceFactory,
    csv_of,
    fill_upstream_batch,
    form,
    keyed_batch,
)

BATCH_FULL = "Batch cannot exceed 20 hospitals"


async def delete_hospitals(directory: RunningDirectory, ids: Sequence[int]) -> None:
    async with aiohttp.ClientSession() as http:
        for hospital_id in ids:
            async with http.delete(f"{directory.url}/hospitals/{hospital_id}") as r:
                assert r.status == 204


async def post(service: Service, path: str) -> tuple[int, Any]:
    async with service.http.post(service.url + path) as r:
        return r.status, await r.json()


async def delete(service: Service, path: str) -> tuple[int, Any]:
    async with service.http.delete(service.url + path) as r:
        return r.status, await r.json()


async def event_types(service: Service, batch_id: str) -> list[str]:
    _, page = await service.get(f"/batch/{batch_id}/events?limit=1000")
    return [e["event_type"] for e in page["events"]]


async def wait_rolled_back(service: Service, batch_id: str, within: float = 20.0) -> dict[str, Any]:
    """Poll /status until the rollback is done and the processor has let the batch go."""
    deadline = time.monotonic() + within
    while True:
        _, body = await service.get(f"/batch/{batch_id}/status")
        if body["rolled_back"] and await service.idle(batch_id):
            return dict(body)
        assert time.monotonic() < deadline, f"batch was not rolled back: {body}"
        await asyncio.sleep(0.05)


async def assert_fold_matches_read_model(service: Service, batch_id: str) -> None:
    """The read model (/status) equals the domain fold of the whole stream (/status?as_of)."""
    _, now = await service.get(f"/batch/{batch_id}/status")
    _, folded = await service.get(f"/batch/{batch_id}/status?as_of={now['version']}")
    assert folded == now
    assert rebuild(service.app[SETTINGS].database.path).equal


async def failed_batch(service: Service, directory: RunningDirectory) -> tuple[str, list[int]]:
    """A 3-row batch whose every row the directory refused (its batch was full); fillers' ids."""
    key, batch_id = keyed_batch(service.db_path, "lifecycle")
    fillers = await fill_upstream_batch(directory, batch_id, 20)
    await service.upload(SAMPLE_CSV, headers={"Idempotency-Key": key})
    final = await service.wait_finished(batch_id)
    assert final["processing_status"] == "failed"
    return batch_id, fillers


# Resume -------------------------------------------------------------------------------------


async def test_resume_fails_refused_rows_again_then_creates_them_once_there_is_room(
    service: Service, directory: RunningDirectory
) -> None:
    batch_id, fillers = await failed_batch(service, directory)

    status, body = await post(service, f"/batch/{batch_id}/resume")
    assert status == 202
    assert body["processing_status"] == "processing"
    assert body["failed_hospitals"] == 0 and body["processed_hospitals"] == 0
    again = await service.wait_finished(batch_id)
    assert again["processing_status"] == "failed"
    assert [h["status"] for h in again["hospitals"]] == ["failed"] * 3
    assert all(BATCH_FULL in h["error_message"] for h in again["hospitals"])

    await delete_hospitals(directory, fillers)
    status, _ = await post(service, f"/batch/{batch_id}/resume")
    assert status == 202
    final = await service.wait_finished(batch_id)

    assert final["processing_status"] == "completed"
    assert [h["status"] for h in final["hospitals"]] == ["created_and_activated"] * 3
    stored = directory.standin.hospitals_in_batch(batch_id)
    assert sorted(h["id"] for h in stored) == sorted(h["hospital_id"] for h in final["hospitals"])
    assert all(h["active"] for h in stored)
    assert directory.standin.duplicates() == []
    assert directory.standin.request_counts["create"] == 20 + 3 * 3
    assert (await event_types(service, batch_id)).count("BatchResumed") == 2
    await assert_fold_matches_read_model(service, batch_id)


async def test_a_late_callback_of_a_finished_run_leaves_the_resumed_run_registered(
    service: Service, directory: RunningDirectory
) -> None:
    processor = service.app[PROCESSOR]
    directory.standin.set_delay(0.3)
    key, batch_id = keyed_batch(service.db_path, "late")
    await fill_upstream_batch(directory, batch_id, 20)  # every row refused: the batch fails
    await service.upload(SAMPLE_CSV, headers={"Idempotency-Key": key})
    first_run = processor._runs[batch_id]
    await service.wait_finished(batch_id)

    status, _ = await post(service, f"/batch/{batch_id}/resume")
    assert status == 202
    resumed = processor._runs[batch_id]
    assert resumed is not first_run
    processor._schedule(first_run)  # what a done callback of its last task would do

    assert processor._runs.get(batch_id) is resumed  # the finished run went, not the new one
    again = await service.wait_finished(batch_id)
    assert again["processing_status"] == "failed" and batch_id not in processor._runs


async def test_resume_finds_a_row_that_was_stored_but_unconfirmed_instead_of_resending_it(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    # The first create is stored but its answer is lost, and the check that follows fails:
    # the row ends failed although its hospital exists.
    directory.standin.add_fault("create", "commit_drop", nth=[1])
    directory.standin.add_fault("batch_get", "503", nth=[1, 2])
    async with service_factory(max_attempts=2) as service:
        accepted = await service.upload(SAMPLE_CSV)
        batch_id = accepted["batch_id"]
        first = await service.wait_finished(batch_id)
        assert first["processing_status"] == "partially_completed"
        assert first["failed_hospitals"] == 1
        [failed] = [r for r in first["hospitals"] if r["status"] == "failed"]
        # It may be stored: the message steers the user to resume, not to upload it again.
        assert "may be there, so resume rather than upload it again" in failed["error_message"]

        status, _ = await post(service, f"/batch/{batch_id}/resume")
        assert status == 202
        final = await service.wait_finished(batch_id)
        await assert_fold_matches_read_model(service, batch_id)

    assert final["processing_status"] == "completed"
    assert final["failed_hospitals"] == 0
    assert len(directory.standin.all_hospitals()) == 3
    assert directory.standin.duplicates() == []
    assert directory.standin.request_counts["create"] == 3  # found, never sent again


async def test_resume_is_refused_while_processing_and_when_nothing_failed(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(1.0)
    accepted = await service.upload(SAMPLE_CSV)
    batch_id = accepted["batch_id"]

    status, body = await post(service, f"/batch/{batch_id}/resume")
    assert status == 409
    assert "still processing" in body["detail"]

    await service.wait_finished(batch_id)
    status, body = await post(service, f"/batch/{batch_id}/resume")
    assert status == 409
    assert "nothing to resume" in body["detail"]
    assert await service.idle(batch_id)  # a refused resume leaves nothing behind to wait on
    assert "BatchResumed" not in await event_types(service, batch_id)

    unknown = str(uuid.uuid4())
    status, body = await post(service, f"/batch/{unknown}/resume")
    assert status == 404
    assert body == {"detail": f"Batch with ID {unknown} not found"}


async def test_resume_during_a_rollback_says_it_is_rolled_back_not_still_processing(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(1.0)
    accepted = await service.upload(SAMPLE_CSV)
    batch_id = accepted["batch_id"]
    await creates_received(directory, 1)
    status, _ = await delete(service, f"/batch/{batch_id}")
    assert status == 202  # the creates in flight still run: so does the rollback

    status, body = await post(service, f"/batch/{batch_id}/resume")
    assert status == 409
    assert body["detail"] == f"batch {batch_id} is being rolled back; upload the file again instead"

    await wait_rolled_back(service, batch_id)
    status, body = await post(service, f"/batch/{batch_id}/resume")
    assert status == 409
    assert body["detail"] == f"batch {batch_id} was rolled back; upload the file again instead"


async def test_a_rolled_back_keyed_batch_says_its_key_will_not_load_the_file_again(
    service: Service, directory: RunningDirectory
) -> None:
    # "Upload the file again" with the same Idempotency-Key gives back the rolled-back
    # batch and creates nothing: the refusal must say a new key is needed, and the replay
    # must not claim that an upload was initiated.
    key, batch_id = keyed_batch(service.db_path, "rolled-back")
    await service.upload(SAMPLE_CSV, headers={"Idempotency-Key": key})
    await service.wait_finished(batch_id)
    status, _ = await delete(service, f"/batch/{batch_id}")
    await wait_rolled_back(service, batch_id)

    status, body = await post(service, f"/batch/{batch_id}/resume")
    assert status == 409
    assert "new Idempotency-Key" in body["detail"]
    async with service.http.post(
        f"{service.url}/batch/upload-csv",
        data=form(SAMPLE_CSV),
        headers={"Idempotency-Key": key},
    ) as r:
        status, again = r.status, await r.json()
    assert status == 200
    assert again["batch_id"] == batch_id and again["status"] == "failed"
    assert "initiated" not in again["message"]
    assert "no new batch" in again["message"]
    assert directory.standin.all_hospitals() == []


async def test_two_concurrent_resumes_exactly_one_is_accepted(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id, fillers = await failed_batch(service, directory)
    await delete_hospitals(directory, fillers)
    store = service.app[STORE]
    append = store.append

    async def slow_append(
        stream_id: str, expected_version: int | None, events: Sequence[NewEvent]
    ) -> list[StoredEvent]:
        # Hold the decision open so that both requests have read the batch before either lands.
        if any(e.event.type_name == "BatchResumed" for e in events):
            await asyncio.sleep(0.2)
        return await append(stream_id, expected_version, events)

    monkeypatch.setattr(store, "append", slow_append)

    answers = await asyncio.gather(
        post(service, f"/batch/{batch_id}/resume"), post(service, f"/batch/{batch_id}/resume")
    )

    assert sorted(status for status, _ in answers) == [202, 409]
    final = await service.wait_finished(batch_id)
    assert final["processing_status"] == "completed"
    assert (await event_types(service, batch_id)).count("BatchResumed") == 1
    assert directory.standin.duplicates() == []


@pytest.mark.parametrize("first", ["BatchResumed", "BatchRollbackRequested"])
async def test_a_resume_and_a_rollback_at_once_are_decided_one_after_the_other(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    # Each decision folds the batch from the log when no run holds it. Decided side by side,
    # the rollback's run replaced the resume's without seeing its event (or the resume read
    # the batch before the rollback's request), and the resumed rows went on to be created
    # and activated in a batch asked to be rolled back, which was never rolled back.
    batch_id, fillers = await failed_batch(service, directory)
    await delete_hospitals(directory, fillers)
    directory.standin.set_delay(0.5)
    store = service.app[STORE]
    append = store.append
    deciding = asyncio.Event()

    async def slow_append(
        stream_id: str, expected_version: int | None, events: Sequence[NewEvent]
    ) -> list[StoredEvent]:
        if any(e.event.type_name == first for e in events):
            deciding.set()
            await asyncio.sleep(0.2)  # the other request comes while this one decides
        return await append(stream_id, expected_version, events)

    monkeypatch.setattr(store, "append", slow_append)
    resume = f"/batch/{batch_id}/resume"
    if first == "BatchResumed":
        earlier = asyncio.ensure_future(post(service, resume))
        await deciding.wait()
        (resumed, _), (rolled_back, _) = await asyncio.gather(
            earlier, delete(service, f"/batch/{batch_id}")
        )
        assert (resumed, rolled_back) == (202, 202)
    else:
        earlier = asyncio.ensure_future(delete(service, f"/batch/{batch_id}"))
        await deciding.wait()
        (rolled_back, _), (resumed, body) = await asyncio.gather(earlier, post(service, resume))
        assert (rolled_back, resumed) == (202, 409)
        assert "is being rolled back" in body["detail"]

    final = await wait_rolled_back(service, batch_id)
    assert final["processing_status"] == "failed"
    assert directory.standin.all_hospitals() == []
    types = await event_types(service, batch_id)
    assert types.count("BatchResumed") == (resumed == 202)
    assert types.count("BatchRollbackRequested") == 1 and types.count("BatchRolledBack") == 1
    assert "BatchActivated" not in types
    await assert_fold_matches_read_model(service, batch_id)


async def test_resume_after_an_activation_failure_activates_the_batch(
    service_factory: ServiceFactory, directory: RunningDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.processing.processor")
    directory.standin.add_fault("batch_activate", "503", nth=[1, 2])
    async with service_factory(max_attempts=2) as service:
        accepted = await service.upload(SAMPLE_CSV)
        batch_id = accepted["batch_id"]
        first = await service.wait_finished(batch_id)
        assert first["processing_status"] == "failed"
        assert "did not take effect" in first["activation_error"]
        assert first["failed_hospitals"] == 0

        status, body = await post(service, f"/batch/{batch_id}/resume")
        assert status == 202
        assert body["current_message"] == "Activating batch"
        final = await service.wait_finished(batch_id)
        await assert_fold_matches_read_model(service, batch_id)

    assert final["processing_status"] == "completed"
    assert final["activation_error"] is None
    assert all(h["active"] for h in directory.standin.hospitals_in_batch(batch_id))
    assert directory.standin.request_counts["batch_activate"] == 3
    assert directory.standin.request_counts["create"] == 3
    # The log says what the resume does: it logged "0 failed rows to try again".
    said = [r.getMessage() for r in caplog.records]
    assert f"batch {batch_id} resumed: its activation is tried again" in said


async def partly_activated(
    service: Service, directory: RunningDirectory
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """45 rows, three upstream batches: the lead one is activated alone and takes, then the
    directory refuses the other two (max_attempts 2). (Its id, /status, events page.)"""
    directory.standin.add_fault("batch_activate", "503", nth=[2, 3, 4, 5])
    batch_id = (await service.upload(csv_of(45)))["batch_id"]
    final = await service.wait_finished(batch_id)
    _, page = await service.get(f"/batch/{batch_id}/events?limit=1000")
    return batch_id, final, page


async def test_an_activation_that_fails_after_some_upstream_batches_took_says_which(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    # The lead upstream batch's hospitals are active: the log must say so, and their rows
    # must read created_and_activated, from the log alone.
    async with service_factory(max_attempts=2) as service:
        batch_id, final, page = await partly_activated(service, directory)
        await assert_fold_matches_read_model(service, batch_id)

    assert final["processing_status"] == "failed" and not final["batch_activated"]
    upstream = page["events"][0]["data"]["upstream_batches"]
    stored = {
        u["creation_batch_id"]: directory.standin.hospitals_in_batch(u["creation_batch_id"])
        for u in upstream
    }
    active = sorted(u for u, hospitals in stored.items() if all(h["active"] for h in hospitals))
    assert len(active) == 1
    failed = page["events"][-1]
    assert failed["event_type"] == "BatchActivationFailed"
    assert failed["data"]["activated_upstream_batch_ids"] == active
    active_ids = {h["id"] for hospitals in stored.values() for h in hospitals if h["active"]}
    for row in final["hospitals"]:
        expected = "created_and_activated" if row["hospital_id"] in active_ids else "created"
        assert row["status"] == expected, row


async def test_resume_after_a_partial_activation_does_not_activate_an_upstream_batch_twice(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    # A resume must activate the two refused upstream batches only: the lead one is active,
    # and a second PATCH of it is what UPSTREAM.md forbids (the directory answers 400 and
    # counts it against the limit).
    async with service_factory(max_attempts=2) as service:
        batch_id, first, page = await partly_activated(service, directory)
        assert first["processing_status"] == "failed"
        (took,) = page["events"][-1]["data"]["activated_upstream_batch_ids"]
        before = directory.standin.request_counts["batch_activate"]

        status, _ = await post(service, f"/batch/{batch_id}/resume")
        assert status == 202
        final = await service.wait_finished(batch_id)
        await assert_fold_matches_read_model(service, batch_id)

    assert final["processing_status"] == "completed"
    assert all(h["status"] == "created_and_activated" for h in final["hospitals"])
    assert all(h["active"] for h in directory.standin.hospitals_in_batch(took))
    assert directory.standin.request_counts["batch_activate"] - before == 2


async def test_resume_does_not_activate_again_a_later_upstream_batch_that_took(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    # Three upstream batches: the lead one and one other take, the third is refused twice.
    # The resume must PATCH the third alone: the other one's records show it active.
    directory.standin.add_fault("batch_activate", "503", nth=[3, 4])
    async with service_factory(max_attempts=2) as service:
        batch_id = (await service.upload(csv_of(45)))["batch_id"]
        first = await service.wait_finished(batch_id)
        _, page = await service.get(f"/batch/{batch_id}/events?limit=1000")
        assert first["processing_status"] == "failed"
        assert len(page["events"][-1]["data"]["activated_upstream_batch_ids"]) == 2
        before = directory.standin.request_counts["batch_activate"]

        status, _ = await post(service, f"/batch/{batch_id}/resume")
        assert status == 202
        final = await service.wait_finished(batch_id)

    assert final["processing_status"] == "completed"
    assert all(h["active"] for h in directory.standin.all_hospitals())
    assert directory.standin.request_counts["batch_activate"] - before == 1


async def test_the_log_says_a_rollback_ended_also_when_the_batch_read_failed_before(
    service_factory: ServiceFactory, directory: RunningDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    # Failed already (its activation, or an earlier round of its rollback), a batch rolled
    # back changes no status: the log's last word on it was the failure.
    caplog.set_level(logging.INFO, logger="service.processing.processor")
    directory.standin.add_fault("batch_activate", "503", probability=1.0)
    async with service_factory(max_attempts=2) as service:
        batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
        assert (await service.wait_finished(batch_id))["processing_status"] == "failed"
        status, _ = await delete(service, f"/batch/{batch_id}")
        assert status in (200, 202)
        await wait_rolled_back(service, batch_id)

    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    done = f"batch {batch_id} rolled back: 0 created, 0 failed, 3 deleted of 3 rows"
    assert ("INFO", done) in said


# Rollback -----------------------------------------------------------------------------------


async def creates_received(directory: RunningDirectory, count: int) -> None:
    """Wait until the directory has received `count` creates (within 10 s)."""
    async with asyncio.timeout(10):
        while directory.standin.request_counts["create"] < count:
            await asyncio.sleep(0.01)


def hold_the_next_answer(directory: RunningDirectory) -> None:
    """Hold the directory's next answer 0.5 s, so that a rollback asked for now is still
    under way when its 202 is built: an instant delete could end it first (200)."""
    directory.standin.cold_start(0.5)


async def test_rollback_of_a_completed_batch_deletes_its_hospitals_once(
    service: Service, directory: RunningDirectory
) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    batch_id = accepted["batch_id"]
    await service.wait_finished(batch_id)
    hold_the_next_answer(directory)

    status, body = await delete(service, f"/batch/{batch_id}")
    assert status == 202
    assert (
        body["current_message"]
        == "Rolling back: deleting its hospitals once no create is in flight"
    )
    final = await wait_rolled_back(service, batch_id)

    assert final["processing_status"] == "failed"
    assert final["rolled_back"] is True
    assert final["deleted_hospitals"] == 3 and final["failed_hospitals"] == 0
    assert [h["status"] for h in final["hospitals"]] == ["deleted"] * 3
    assert directory.standin.all_hospitals() == []
    await assert_fold_matches_read_model(service, batch_id)

    status, again = await delete(service, f"/batch/{batch_id}")
    assert status == 200
    assert again["current_message"] == "Rolled back: 3 hospital(s) deleted from the directory"
    assert directory.standin.request_counts["batch_delete"] == 1
    types = await event_types(service, batch_id)
    assert types.count("BatchRollbackRequested") == 1 and types.count("BatchRolledBack") == 1
    _, page = await service.get(f"/batch/{batch_id}/events?limit=1000")
    (rolled_back,) = [e["data"] for e in page["events"] if e["event_type"] == "BatchRolledBack"]
    assert rolled_back["deleted_count"] == 3  # as the directory answered
    status, body = await post(service, f"/batch/{batch_id}/resume")
    assert status == 409 and "rolled back" in body["detail"]


async def test_rollback_of_a_running_batch_stops_creates_and_deletes_those_in_flight(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(1.0)
    accepted = await service.upload(csv_of(30))  # 20 workers: 20 creates in flight, 10 queued
    batch_id = accepted["batch_id"]
    await creates_received(directory, 20)
    sent = directory.standin.request_counts["create"]
    assert sent == 20

    answers = await asyncio.gather(
        delete(service, f"/batch/{batch_id}"), delete(service, f"/batch/{batch_id}")
    )
    assert [status for status, _ in answers] == [202, 202]
    final = await wait_rolled_back(service, batch_id)

    assert directory.standin.request_counts["create"] == sent
    assert directory.standin.all_hospitals() == []
    assert final["processing_status"] == "failed"
    assert final["deleted_hospitals"] == 20 and final["failed_hospitals"] == 10
    in_flight, queued = final["hospitals"][:20], final["hospitals"][20:]
    assert {h["status"] for h in in_flight} == {"deleted"}
    assert all(h["hospital_id"] is not None for h in in_flight)  # recorded before deleting
    assert {h["status"] for h in queued} == {"failed"}
    assert {h["error_message"] for h in queued} == {ROLLED_BACK_MESSAGE}
    types = await event_types(service, batch_id)
    assert types.count("HospitalCreated") == 20
    assert types.count("BatchRollbackRequested") == 1
    assert "BatchActivated" not in types
    # Rows that were ready to go are withdrawn, not mistaken for lost answers and looked up.
    _, page = await service.get(f"/batch/{batch_id}/events?after=-1&limit=500")
    retries = [e["data"] for e in page["events"] if e["event_type"] == "HospitalRetryScheduled"]
    assert len(retries) == 10 and {r["reason"] for r in retries} == {"withdrawn"}
    assert all(r["message"] == "not sent: the batch is being rolled back" for r in retries)
    assert directory.standin.request_counts["batch_get"] == 0
    await assert_fold_matches_read_model(service, batch_id)


async def test_a_rollback_waits_for_a_create_in_flight_in_another_upstream_batch(
    service_factory: ServiceFactory, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Row 1's answer is lost, so its upstream batch is checked while row 21, of the second
    # upstream batch, is still being created: the check's end must not start the deletes.
    standin = directory.standin
    standin.set_delay(1.0)
    standin.add_fault("create", "reset", nth=[1])
    store_after_the_delay = standin._sleep_then_store

    row_21_sent = asyncio.Event()

    async def slower_for_row_21(new: NewHospital) -> Hospital:
        if new.name == "Hospital 21":
            row_21_sent.set()
            await asyncio.sleep(2.0)
        return await store_after_the_delay(new)

    monkeypatch.setattr(standin, "_sleep_then_store", slower_for_row_21)
    async with service_factory(settle_seconds=0.3) as service:
        batch_id = (await service.upload(csv_of(21)))["batch_id"]
        await asyncio.wait_for(row_21_sent.wait(), 10)  # in flight, not withdrawn
        status, _ = await delete(service, f"/batch/{batch_id}")
        assert status == 202
        final = await wait_rolled_back(service, batch_id)

    assert standin.all_hospitals() == []  # row 21 too: deleted after its create ended
    assert {h["status"] for h in final["hospitals"]} <= {"deleted", "failed"}
    assert final["hospitals"][20]["status"] == "deleted"


async def test_rollback_withdraws_rows_waiting_for_the_rate_window_without_waiting_it_out(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    # 2 creates a window of 30 s: the third row is ready, waiting for the next window.
    async with service_factory(creates_per_minute=2, rate_window_seconds=30.0) as service:
        batch_id = (await service.upload(csv_of(3)))["batch_id"]
        async with asyncio.timeout(10):
            while directory.standin.request_counts["create"] < 2:
                await asyncio.sleep(0.05)
        started = time.monotonic()
        hold_the_next_answer(directory)
        status, _ = await delete(service, f"/batch/{batch_id}")
        final = await wait_rolled_back(service, batch_id)
        took = time.monotonic() - started

    assert status == 202
    assert took < 15  # not the rest of the 30 s window
    assert directory.standin.request_counts["create"] == 2
    assert final["deleted_hospitals"] == 2 and final["failed_hospitals"] == 1
    assert directory.standin.all_hospitals() == []


async def test_rollback_treats_a_batch_already_gone_from_the_directory_as_deleted(
    service: Service, directory: RunningDirectory
) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    batch_id = accepted["batch_id"]
    await service.wait_finished(batch_id)
    directory.standin.restart()  # the directory lost everything: its batch answers 404
    hold_the_next_answer(directory)

    status, _ = await delete(service, f"/batch/{batch_id}")
    assert status == 202
    final = await wait_rolled_back(service, batch_id)

    assert [h["status"] for h in final["hospitals"]] == ["deleted"] * 3
    assert directory.standin.request_counts["batch_delete"] == 1
    _, page = await service.get(f"/batch/{batch_id}/events?limit=100")
    assert page["events"][-1]["data"]["deleted_count"] == 0


async def wait_rollback_failed(service: Service, batch_id: str, rounds: int) -> dict[str, Any]:
    """Poll until the batch's `rounds`-th rollback has failed and the processor let it go."""
    deadline = time.monotonic() + 10
    while True:
        failed = (await event_types(service, batch_id)).count("BatchRollbackFailed")
        if failed == rounds and await service.idle(batch_id):
            _, body = await service.get(f"/batch/{batch_id}/status")  # read after the fact
            return dict(body)
        assert failed <= rounds and time.monotonic() < deadline, f"{failed} failed rollbacks"
        await asyncio.sleep(0.05)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the operator's log said of refused rollbacks, once each."""
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [line for line in said if "nothing more is tried" in line]


async def test_a_refused_rollback_fails_each_round_once_and_keeps_what_it_deleted(
    service_factory: ServiceFactory, directory: RunningDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    async with service_factory(max_attempts=3) as service:
        accepted = await service.upload(csv_of(25))  # upstream batches of 20 and 5 rows
        batch_id = accepted["batch_id"]
        await service.wait_finished(batch_id)
        # Each round: the first upstream batch goes (or is gone: 404), the second is refused
        # through all 3 tries; the third round is let through.
        directory.standin.add_fault("batch_delete", "503", nth=[2, 3, 4, 6, 7, 8])

        status, _ = await delete(service, f"/batch/{batch_id}")
        assert status == 202
        first = await wait_rollback_failed(service, batch_id, rounds=1)
        await asyncio.sleep(0.3)  # a failed round is not followed by another one
        assert directory.standin.request_counts["batch_delete"] == 4

        assert first["rollback_error"].startswith("the directory did not delete upstream batch ")
        assert [h["status"] for h in first["hospitals"]] == ["deleted"] * 20 + [
            "created_and_activated"
        ] * 5
        assert first["rolled_back"] is False and first["deleted_hospitals"] == 20
        assert len(directory.standin.all_hospitals()) == 5
        _, progress = await service.get(f"/batch/{batch_id}/progress")
        assert progress["current_message"] == (
            f"Rollback failed: {first['rollback_error']}; roll back again to retry"
        )
        status, refused = await post(service, f"/batch/{batch_id}/resume")
        assert status == 409 and "roll it back again" in refused["detail"]
        await assert_fold_matches_read_model(service, batch_id)
        refusal = (
            f"batch {batch_id} completed: 5 created, 0 failed, 20 deleted of 25 rows; "
            f"{first['rollback_error']}; nothing more is tried until DELETE /batch/{batch_id} "
            "is sent again"
        )
        assert refusals(caplog) == [refusal]

        status, _ = await delete(service, f"/batch/{batch_id}")  # refused again
        assert status == 202
        await wait_rollback_failed(service, batch_id, rounds=2)  # its own fact, not dropped
        assert refusals(caplog) == [refusal, refusal]  # said again, though the status stays
        status, _ = await delete(service, f"/batch/{batch_id}")
        assert status == 202
        final = await wait_rolled_back(service, batch_id)

        assert final["rollback_error"] is None
        assert [h["status"] for h in final["hospitals"]] == ["deleted"] * 25
        assert directory.standin.all_hospitals() == []
        assert directory.standin.request_counts["batch_delete"] == 10
        types = await event_types(service, batch_id)
        assert types[-6:] == ["BatchRollbackRequested", "BatchRollbackFailed"] * 2 + [
            "BatchRollbackRequested",
            "BatchRolledBack",
        ]
        await assert_fold_matches_read_model(service, batch_id)


async def test_a_refused_rollback_of_a_running_batch_leaves_its_unsent_rows_failed(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    async with service_factory(max_attempts=2) as service:
        directory.standin.set_delay(0.5)
        directory.standin.add_fault("batch_delete", "503", probability=1.0)
        accepted = await service.upload(csv_of(30))  # 20 workers: 20 in flight, 10 queued
        batch_id = accepted["batch_id"]
        await creates_received(directory, 20)

        status, _ = await delete(service, f"/batch/{batch_id}")
        assert status == 202
        final = await wait_rollback_failed(service, batch_id, rounds=1)

        assert final["processing_status"] == "failed"  # finished: it will not be activated
        rows = final["hospitals"]
        assert {h["status"] for h in rows[:20]} == {"created"}
        assert {h["status"] for h in rows[20:]} == {"failed"}
        assert {h["error_message"] for h in rows[20:]} == {ROLLBACK_ASKED_MESSAGE}
        assert directory.standin.request_counts["create"] == 20
        async with service.http.ws_connect(f"{service.url}/batch/{batch_id}/ws") as ws:
            messages = [await ws.receive_json(timeout=5) for _ in range(2)]
        assert [m["type"] for m in messages] == ["snapshot", "finished"]
        await assert_fold_matches_read_model(service, batch_id)


async def test_a_rollback_between_an_upload_s_commit_and_its_start_is_the_one_carried_out(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rollback folded the batch from the log and took it up; the upload then started a
    # run of its own from BatchCreated alone, which never saw the rollback: it sent creates
    # after the batch read rolled back, and, its fold stuck behind the log, sent them again
    # and again (2,685 creates in 3 s; 21 hospitals left in the directory).
    committed = hold_after_commit(service, monkeypatch, "BatchCreated")
    key, batch_id = keyed_batch(service.db_path, "window")
    uploading = asyncio.ensure_future(service.upload(SAMPLE_CSV, headers={"Idempotency-Key": key}))
    await committed.wait()

    (status, _), _ = await asyncio.gather(delete(service, f"/batch/{batch_id}"), uploading)

    assert status == 202
    final = await wait_rolled_back(service, batch_id)
    assert [h["status"] for h in final["hospitals"]] == ["failed"] * 3
    assert directory.standin.request_counts["create"] == 0
    assert await event_types(service, batch_id) == [
        "BatchCreated",
        "BatchRollbackRequested",
        "BatchRolledBack",
    ]
    await assert_fold_matches_read_model(service, batch_id)
