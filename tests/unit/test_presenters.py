"""The /progress and /status numbers and message, from a folded batch."""

from __future__ import annotations

from typing import Any

from service.domain import batch as b
from service.domain import events as ev
from service.web import presenters

BATCH_ID = "6f1d4c1e-3b7a-4a53-9a39-0d6c2f0e8b11"
AT = "2024-05-01T12:00:00+00:00"


def progress(*events: ev.Event, rows: int = 3, held: float = 0.0) -> dict[str, Any]:
    """The /progress body of a batch of `rows` rows folded through `events`."""
    file_rows = tuple(
        ev.Row(n, f"Hospital {n}", f"{n} Main St", None, n + 1) for n in range(1, rows + 1)
    )
    created = b.plan(BATCH_ID, "f.csv", file_rows, batch_size=20, content_sha256="sha")
    state = b.fold([(created, AT), *((e, AT) for e in events)])
    return presenters.progress(presenters.batch_record(state), held)


def created(row: int) -> ev.HospitalCreated:
    return ev.HospitalCreated(row, 1000 + row)


def failed(row: int) -> ev.HospitalFailed:
    return ev.HospitalFailed(row, "rejected", f"row {row} refused", retryable=False)


def test_progress_is_a_percentage_with_two_decimals() -> None:
    body = progress(ev.HospitalRequested((1, 2), (1, 1)), created(1), created(2))

    assert (body["processed_hospitals"], body["progress_percentage"]) == (2, 66.67)
    assert body["current_message"] == "Processing hospital 2/3"


def test_rows_a_rollback_deleted_count_as_processed() -> None:
    body = progress(
        created(1),
        created(2),
        failed(3),
        ev.BatchRollbackRequested(),
        ev.BatchRolledBack(2, (BATCH_ID,)),
    )

    assert (body["processed_hospitals"], body["failed_hospitals"]) == (3, 1)
    assert body["progress_percentage"] == 100.0


def test_a_partly_completed_batch_says_how_many_rows_were_created_and_failed() -> None:
    body = progress(created(1), failed(2), failed(3))

    assert body["processing_status"] == b.PARTIALLY_COMPLETED
    assert body["current_message"] == (
        "Finished with errors: 1 created, 2 failed; "
        "batch not activated (resume to retry the failed rows)"
    )


def test_a_batch_of_failed_rows_points_to_resume_not_to_a_new_upload() -> None:
    # A row that failed because the directory could not be read may be stored: a new
    # upload would create it twice, a resume looks for it first.
    unread = ev.HospitalFailed(1, b.UNCONFIRMED, "could not check the directory", retryable=True)
    body = progress(unread, failed(2), failed(3))

    assert body["processing_status"] == b.FAILED
    assert body["current_message"] == (
        "Failed: none of the 3 hospital(s) was confirmed created (resume to retry the failed rows)"
    )


def test_the_rate_window_is_mentioned_while_the_batch_is_queued_or_processing() -> None:
    queued = progress(held=12.2)
    running = progress(ev.HospitalRequested((1,), (1,)), held=12.2)
    done = progress(ev.HospitalRequested((1,), (1,)), failed(1), failed(2), failed(3), held=9)

    assert queued["current_message"] == (
        "Queued: 3 hospital(s) waiting to be created; "
        "the directory's rate limit holds the next creates for 13 s"
    )
    assert "rate limit" not in done["current_message"]
    assert running["current_message"] == (
        "Processing hospital 0/3; the directory's rate limit holds the next creates for 13 s"
    )


def test_processing_time_is_never_negative_when_the_clock_stepped_back() -> None:
    rows = (ev.Row(1, "Hospital 1", "1 Main St", None, 2),)
    created_ = b.plan(BATCH_ID, "f.csv", rows, batch_size=20, content_sha256="sha")
    upstream = created_.upstream_batches[0].creation_batch_id
    run = [ev.HospitalRequested((1,), (1,)), created(1), ev.BatchActivated(1, (upstream,))]

    def seconds(finished_at: str) -> float:
        state = b.fold([(created_, AT), *((e, finished_at) for e in run)])
        assert state.status == b.COMPLETED
        numbers = presenters.status_numbers(presenters.batch_record(state))
        return float(numbers["processing_time_seconds"])

    assert seconds("2024-05-01T12:00:02.5+00:00") == 2.5
    assert seconds("2024-05-01T11:00:00+00:00") == 0.0  # an hour back, by NTP: not -3600
