"""Listing batches, exporting results, idempotent uploads and /hospitals/bulk, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import sqlite3
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from service.domain.batch import BATCH_STATUSES
from service.domain.csv_intake import problem
from service.local_directory import RunningDirectory
from tests.integration.conftest import hold_after_commit
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
)

REFUSED = "the directory refused the row (HTTP 400): Batch cannot exceed 20 hospitals"


async def upload_into_full_batch(
    service: Service, directory: RunningDirectory, content: str, room: int
) -> str:
    """Upload `content` into a directory batch with room for `room` rows; its batch id."""
    key, batch_id = keyed_batch(service.db_path, "export")
    await fill_upstream_batch(directory, batch_id, 20 - room)
    await service.upload(content, headers={"Idempotency-Key": key})
    await service.wait_finished(batch_id)
    return batch_id


async def upload(
    service: Service, content: str, key: str | None = None, path: str = "/batch/upload-csv"
) -> tuple[int, Any, Mapping[str, str]]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    async with service.http.post(service.url + path, data=form(content), headers=headers) as r:
        return r.status, await r.json(), r.headers


async def listing(service: Service, **query: str | int) -> dict[str, Any]:
    status, body = await service.get(f"/batch?{urlencode(query)}")
    assert status == 200, body
    return dict(body)


async def results(service: Service, batch_id: str, query: str = "") -> tuple[list[list[str]], str]:
    """GET results.csv; (its rows parsed, its raw text)."""
    async with service.http.get(f"{service.url}/batch/{batch_id}/results.csv{query}") as r:
        assert r.status == 200
        assert r.content_type == "text/csv"
        suffix = "failed" if query else "results"
        assert r.headers["Content-Disposition"] == (
            f'attachment; filename="{batch_id}-{suffix}.csv"'
        )
        assert r.headers["X-Content-Type-Options"] == "nosniff"  # hospital names are no page
        text = await r.text()
    return list(csv.reader(io.StringIO(text))), text


# Listing ------------------------------------------------------------------------------------


async def test_batches_are_listed_newest_first_with_progress_and_paged_by_cursor(
    service: Service,
) -> None:
    ids = []
    for n in range(3):
        accepted = await service.upload(csv_of(n + 1, prefix=f"Batch {n}"))
        await service.wait_finished(accepted["batch_id"])
        ids.append(accepted["batch_id"])

    first = await listing(service, limit=2)
    assert [b["batch_id"] for b in first["batches"]] == [ids[2], ids[1]]
    assert first["next_cursor"] is not None
    newest = first["batches"][0]
    assert newest["total_hospitals"] == 3 and newest["processed_hospitals"] == 3
    assert newest["progress_percentage"] == 100.0 and newest["failed_hospitals"] == 0
    assert newest["processing_status"] == "completed" and newest["batch_activated"] is True
    assert newest["file_name"] == "hospitals.csv" and newest["deleted_hospitals"] == 0
    assert newest["created_at"] < newest["finished_at"]

    second = await listing(service, limit=2, cursor=first["next_cursor"])
    assert [b["batch_id"] for b in second["batches"]] == [ids[0]]
    assert second["next_cursor"] is None
    everything = await listing(service)
    assert [b["batch_id"] for b in everything["batches"]] == ids[::-1]
    exact = await listing(service, limit=3)  # a page of them all is the last: no cursor
    assert len(exact["batches"]) == 3 and exact["next_cursor"] is None


async def test_listing_filters_by_status_and_refuses_bad_queries(
    service: Service, directory: RunningDirectory
) -> None:
    completed = await service.upload(SAMPLE_CSV)
    await service.wait_finished(completed["batch_id"])
    failed = await upload_into_full_batch(service, directory, SAMPLE_CSV, room=0)

    only_failed = await listing(service, status="failed")
    assert [b["batch_id"] for b in only_failed["batches"]] == [failed]
    assert only_failed["batches"][0]["failed_hospitals"] == 3
    only_completed = await listing(service, status="completed")
    assert [b["batch_id"] for b in only_completed["batches"]] == [completed["batch_id"]]
    assert (await listing(service, status="processing"))["batches"] == []
    status, either = await service.get("/batch?status=completed&status=failed&limit=1")
    assert status == 200
    assert [b["batch_id"] for b in either["batches"]] == [failed]  # the newest of both
    status, rest = await service.get(
        f"/batch?status=completed&status=failed&cursor={either['next_cursor']}"
    )
    assert [b["batch_id"] for b in rest["batches"]] == [completed["batch_id"]]

    not_ours = "MjAyNi0wMS0wMXxhLWJhdGNoLWlk"  # base64 of "2026-01-01|a-batch-id"
    for query, field in (
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("cursor=xyz", "cursor"),
        (f"cursor={not_ours}", "cursor"),
    ):
        status, body = await service.get(f"/batch?{query}")
        assert status == 422, query
        assert body["detail"][0]["loc"] == ["query", field]
    for query in ("status=done", "status=failed&status="):  # one of several, too
        _, body = await service.get(f"/batch?{query}")
        statuses = ", ".join(BATCH_STATUSES)
        assert body["detail"] == [
            problem(["query", "status"], f"Must be one of: {statuses}.", "value_error")
        ]


# Results export -------------------------------------------------------------------------------


async def test_results_csv_has_every_row_quoted_and_formulas_kept_inert(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    upload_csv = (
        "name,address,phone\n"
        '"Saint Mary\'s, North","1 ""Quoted"" Road",+1-555-0100\n'
        '"=HYPERLINK(""http://x"")",@SUM(A1),-2+3\n'
        "Plain Clinic,2 Side Street,\n"
    )
    async with service_factory(concurrency=1) as service:  # rows are sent in file order
        batch_id = await upload_into_full_batch(service, directory, upload_csv, room=1)

        rows, text = await results(service, batch_id)
        failed_rows, failed_text = await results(service, batch_id, "?only=failed")
        _, status = await service.get(f"/batch/{batch_id}/status")
        invalid, body = await service.get(f"/batch/{batch_id}/results.csv?only=created")
        async with service.http.post(
            f"{service.url}/batch/validate-csv", data=form(failed_text)
        ) as r:
            validation = await r.json()
        again = await service.upload(failed_text)
        _, again_status = await service.get(f"/batch/{again['batch_id']}/status")

    hospital_id = str(status["hospitals"][0]["hospital_id"])
    assert rows == [
        ["row", "name", "address", "phone", "status", "hospital_id", "error_message"],
        ["1", "Saint Mary's, North", '1 "Quoted" Road', "'+1-555-0100", "created", hospital_id, ""],
        ["2", '\'=HYPERLINK("http://x")', "'@SUM(A1)", "'-2+3", "failed", "", REFUSED],
        ["3", "Plain Clinic", "2 Side Street", "", "failed", "", REFUSED],
    ]
    assert text.startswith("row,name,address,phone,status,hospital_id,error_message\r\n")
    assert '"Saint Mary\'s, North","1 ""Quoted"" Road"' in text
    assert failed_rows == [
        ["name", "address", "phone"],
        ['\'=HYPERLINK("http://x")', "'@SUM(A1)", "'-2+3"],
        ["Plain Clinic", "2 Side Street", ""],
    ]
    assert validation["valid"] is True and validation["total_rows"] == 2  # ready to upload again
    assert [(h["name"], h["address"], h["phone"]) for h in again_status["hospitals"]] == [
        ('=HYPERLINK("http://x")', "@SUM(A1)", "-2+3"),  # the export's ' taken off again
        ("Plain Clinic", "2 Side Street", None),
    ]
    assert invalid == 422 and body["detail"][0]["loc"] == ["query", "only"]


async def test_the_failed_rows_of_an_activated_batch_are_the_header_alone(
    service: Service,
) -> None:
    # Its rows read active, not created: the file is made to be uploaded again, and rows
    # that are not failed would create their hospitals twice.
    accepted = await service.upload(SAMPLE_CSV)
    await service.wait_finished(accepted["batch_id"])

    failed_rows, _ = await results(service, accepted["batch_id"], "?only=failed")

    assert failed_rows == [["name", "address", "phone"]]


async def test_results_of_an_unknown_batch_are_404(service: Service) -> None:
    unknown = str(uuid.uuid4())
    status, body = await service.get(f"/batch/{unknown}/results.csv")
    assert status == 404
    assert body == {"detail": f"Batch with ID {unknown} not found"}


# Idempotent upload --------------------------------------------------------------------------


async def test_the_same_key_on_another_database_is_another_batch_upstream_too(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    key = "import-2025-09-20"  # the README's example: keys get reused
    ids = []
    for name in ("one.db", "two.db"):
        async with running_service(fast_settings(tmp_path / name, directory.url)) as service:
            status, accepted, _ = await upload(service, SAMPLE_CSV, key)
            assert status == 202
            ids.append(accepted["batch_id"])
            assert (await service.wait_finished(ids[-1]))["processing_status"] == "completed"

    assert ids[0] != ids[1]
    assert [len(directory.standin.hospitals_in_batch(i)) for i in ids] == [3, 3]


async def test_a_key_used_before_the_database_had_its_namespace_still_finds_its_batch(
    service_factory: ServiceFactory, db_path: Path
) -> None:
    key = "idem-" + uuid.uuid4().hex
    async with service_factory() as service:
        status, first, _ = await upload(service, SAMPLE_CSV, key)
        await service.wait_finished(first["batch_id"])
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:  # as an upgrade gives it
        conn.execute("UPDATE instance SET idempotency_namespace = ?", (uuid.uuid4().hex,))

    async with service_factory() as service:
        status, again, _ = await upload(service, SAMPLE_CSV, key)

    assert status == 200
    assert again["batch_id"] == first["batch_id"]


async def test_idempotency_key_replays_the_same_file_and_refuses_another(
    service: Service, directory: RunningDirectory
) -> None:
    key = "idem-" + uuid.uuid4().hex
    twice = SAMPLE_CSV + SAMPLE_CSV.splitlines(keepends=True)[1]  # row 4 repeats row 1
    status, first, headers = await upload(service, twice, key)
    assert status == 202 and "Idempotent-Replayed" not in headers
    batch_id = first["batch_id"]
    assert [w["type"] for w in first["warnings"]] == ["duplicate_row"]
    await service.wait_finished(batch_id)

    status, again, headers = await upload(service, twice, key)
    assert status == 200
    assert again["batch_id"] == batch_id and again["status"] == "completed"
    assert again["warnings"] == first["warnings"]  # the same file, the same warnings
    assert headers["Location"] == f"/batch/{batch_id}/status"
    assert headers["Idempotent-Replayed"] == "true"
    assert "no new batch was created" in again["message"]
    status, refused, _ = await upload(service, csv_of(2), key)
    assert status == 409
    assert batch_id in refused["detail"] and "different file" in refused["detail"]
    assert [b["batch_id"] for b in (await listing(service))["batches"]] == [batch_id]
    assert len(directory.standin.all_hospitals()) == 4

    unkeyed = [await upload(service, SAMPLE_CSV) for _ in range(2)]
    assert [status for status, _, _ in unkeyed] == [202, 202]
    assert len({body["batch_id"] for _, body, _ in unkeyed} | {batch_id}) == 3


# /hospitals/bulk ------------------------------------------------------------------------------


async def test_bulk_waits_for_the_batch_and_answers_its_status(
    service: Service, directory: RunningDirectory
) -> None:
    status, body, _ = await upload(service, SAMPLE_CSV, path="/hospitals/bulk")

    assert status == 200
    assert body["processing_status"] == "completed"
    assert [h["status"] for h in body["hospitals"]] == ["created_and_activated"] * 3
    _, now = await service.get(f"/batch/{body['batch_id']}/status")
    assert body == now
    assert len(directory.standin.hospitals_in_batch(body["batch_id"])) == 3


async def test_bulk_says_when_its_answer_is_an_earlier_batch_of_the_same_key(
    service: Service,
) -> None:
    # Its /status body has no message: without the header, a repeated upload of a batch
    # since rolled back read as a new upload rolled back.
    key = "bulk-" + uuid.uuid4().hex
    status, first, headers = await upload(service, SAMPLE_CSV, key, path="/hospitals/bulk")
    assert status == 200 and "Idempotent-Replayed" not in headers

    status, again, headers = await upload(service, SAMPLE_CSV, key, path="/hospitals/bulk")

    assert status == 200 and again["batch_id"] == first["batch_id"]
    assert headers["Idempotent-Replayed"] == "true"


async def test_a_bulk_upload_with_the_key_of_a_batch_not_taken_up_yet_waits_for_it(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same key twice at once: the second read the first's batch between its commit and
    # the processor taking it up, and answered 200 with a /status body still "pending".
    committed = hold_after_commit(service, monkeypatch, "BatchCreated")
    key = "bulk-" + uuid.uuid4().hex
    first = asyncio.ensure_future(upload(service, SAMPLE_CSV, key, path="/hospitals/bulk"))
    await committed.wait()

    (status, again, headers), (_, body, _) = await asyncio.gather(
        upload(service, SAMPLE_CSV, key, path="/hospitals/bulk"), first
    )

    assert status == 200 and headers["Idempotent-Replayed"] == "true"
    assert again["processing_status"] == "completed"
    assert body == again


async def test_a_bulk_upload_with_the_key_of_a_batch_being_rolled_back_waits_for_the_rollback(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rollback of a finished batch has it taken up again only once its request committed.
    key = "bulk-" + uuid.uuid4().hex
    status, first, _ = await upload(service, SAMPLE_CSV, key, path="/hospitals/bulk")
    assert status == 200 and first["processing_status"] == "completed"
    committed = hold_after_commit(service, monkeypatch, "BatchRollbackRequested")

    async def roll_back() -> int:
        async with service.http.delete(f"{service.url}/batch/{first['batch_id']}") as r:
            return r.status

    rollback = asyncio.ensure_future(roll_back())
    await committed.wait()

    (status, again, _), rollback_status = await asyncio.gather(
        upload(service, SAMPLE_CSV, key, path="/hospitals/bulk"), rollback
    )

    assert rollback_status == 202
    assert status == 200 and again["rolled_back"] is True
    assert [h["status"] for h in again["hospitals"]] == ["deleted"] * 3
    assert directory.standin.all_hospitals() == []


async def test_bulk_answers_202_with_the_batch_id_when_the_wait_runs_out(
    directory: RunningDirectory, db_path: Path
) -> None:
    directory.standin.set_delay(1.0)
    settings = fast_settings(db_path, directory.url).replace(api={"bulk_wait_seconds": 0.3})
    async with running_service(settings) as service:
        started = time.monotonic()
        status, body, headers = await upload(service, SAMPLE_CSV, path="/hospitals/bulk")
        waited = time.monotonic() - started
        final = await service.wait_finished(body["batch_id"])

    assert status == 202
    assert waited >= 0.3
    assert body["total_hospitals"] == 3 and body["status"] == "processing"
    assert headers["Location"] == f"/batch/{body['batch_id']}/status"
    assert final["processing_status"] == "completed"
