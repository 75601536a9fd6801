"""Read models shaped into the JSON bodies users of the original tool already know."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from service.domain import batch as b

Record = dict[str, Any]


def _processed(batch: Record) -> int:
    return int(batch["created_rows"] + batch["failed_rows"] + batch["deleted_rows"])


def current_message(batch: Record) -> str:
    """One line saying where the batch is, for people watching it."""
    total, status = batch["total_rows"], batch["status"]
    processed, failed = _processed(batch), batch["failed_rows"]
    if batch["rolled_back"]:
        return f"Rolled back: {batch['deleted_rows']} hospital(s) deleted from the directory"
    if batch["rollback_error"]:
        return f"Rollback failed: {batch['rollback_error']}; roll back again to retry"
    if batch["rollback_requested"]:
        return "Rolling back: deleting its hospitals once no create is in flight"
    if status == b.PENDING:
        return f"Queued: {total} hospital(s) waiting to be created"
    if status == b.PROCESSING and processed == total:
        return "Activating batch"
    if status == b.PROCESSING:
        return f"Processing hospital {processed}/{total}"
    if status == b.COMPLETED:
        return f"Completed: {total} hospital(s) created and activated"
    if status == b.PARTIALLY_COMPLETED:
        return (
            f"Finished with errors: {total - failed} created, {failed} failed; "
            "batch not activated (resume to retry the failed rows)"
        )
    if batch["activation_error"]:
        return f"Activation failed: {batch['activation_error']}"
    # Not "could not be created": a row whose check could not read the directory may be
    # there, and uploading the file again would create it twice.
    return (
        f"Failed: none of the {total} hospital(s) was confirmed created "
        "(resume to retry the failed rows)"
    )


def progress(batch: Record, held: float = 0.0) -> Record:
    """The /progress body; `held`: seconds the directory's rate window still holds the
    batch's next creates back."""
    total = batch["total_rows"]
    processed = _processed(batch)
    message = current_message(batch)
    if held > 0 and batch["status"] in (b.PENDING, b.PROCESSING):
        message += f"; the directory's rate limit holds the next creates for {math.ceil(held)} s"
    return {
        "batch_id": batch["batch_id"],
        "progress_percentage": round(100.0 * processed / total, 2) if total else 100.0,
        "processing_status": batch["status"],
        "processed_hospitals": processed,
        "total_hospitals": total,
        "failed_hospitals": batch["failed_rows"],
        "current_message": message,
    }


def _elapsed(batch: Record, until: str | None = None) -> float:
    """From upload to the end, or to `until` (or now) while the batch runs; never below 0,
    as the wall clock the times come from may have stepped back since the upload."""
    started = datetime.fromisoformat(batch["created_at"])
    end = batch["finished_at"] or until
    ended = datetime.fromisoformat(end) if end else datetime.now(UTC)
    return max(0.0, round((ended - started).total_seconds(), 3))


def row_result(row: Record) -> Record:
    """One entry of /status `hospitals` (queries.ROW_RESULTS_JSON builds the same in SQLite)."""
    return {
        "row": row["row"],
        "hospital_id": row["hospital_id"],
        "name": row["name"],
        "address": row["address"],
        "phone": row["phone"],
        "status": row["status"],
        "error_message": row["error_message"] if row["status"] != b.ROW_CREATED else None,
    }


def status(batch: Record, rows: list[Record], until: str | None = None) -> Record:
    """The /status body: the batch's numbers and every row's result.

    `until` is when the view was taken (a past version's last event): a batch still running
    then counts its processing time up to it, not up to now.
    """
    return {**status_numbers(batch, until), "hospitals": [row_result(r) for r in rows]}


def status_numbers(batch: Record, until: str | None = None) -> Record:
    """The /status body without its last field, `hospitals`."""
    return {
        "batch_id": batch["batch_id"],
        "total_hospitals": batch["total_rows"],
        "processed_hospitals": _processed(batch),
        "failed_hospitals": batch["failed_rows"],
        "deleted_hospitals": batch["deleted_rows"],
        "processing_time_seconds": _elapsed(batch, until),
        "batch_activated": bool(batch["activated"]),
        "processing_status": batch["status"],
        "activation_error": batch["activation_error"],
        "rollback_error": batch["rollback_error"],
        "rolled_back": bool(batch["rolled_back"]),
        "version": batch["stream_version"],
    }


def summary(batch: Record) -> Record:
    """One entry of the batch listing."""
    return {
        **progress(batch),
        "file_name": batch["file_name"],
        "created_at": batch["created_at"],
        "finished_at": batch["finished_at"],
        "batch_activated": bool(batch["activated"]),
        "deleted_hospitals": batch["deleted_rows"],
    }


def batch_record(state: b.BatchState) -> Record:
    """A folded batch in the `batches` read model's shape, so one presenter serves both."""
    counts = state.counts()
    return {
        "batch_id": state.batch_id,
        "file_name": state.file_name,
        "total_rows": counts.total,
        "created_rows": counts.created,
        "failed_rows": counts.failed,
        "deleted_rows": counts.deleted,
        "activated": state.activated,
        "activation_error": state.activation_failure,
        "rollback_requested": state.rollback_requested,
        "rollback_error": state.rollback_failure,
        "rolled_back": state.rolled_back,
        "status": state.status,
        "stream_version": state.version,
        "created_at": state.created_at,
        "finished_at": state.finished_at,
    }


def records_of(state: b.BatchState) -> tuple[Record, list[Record]]:
    """A folded batch and its rows in the read models' shape."""
    rows = [
        {
            "row": r.row.row,
            "hospital_id": r.hospital_id,
            "name": r.row.name,
            "address": r.row.address,
            "phone": r.row.phone,
            "status": b.row_status(r.status, state.row_activated(r)),
            "error_message": r.error,
        }
        for r in state.rows.values()
    ]
    return batch_record(state), rows
