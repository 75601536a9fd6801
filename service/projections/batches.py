"""The `batches` and `batch_rows` read models, kept in the writer's transaction."""

from __future__ import annotations

import sqlite3

from service.domain import batch as b
from service.domain import events as ev
from service.store.records import StoredEvent

CREATED_STATUSES = (b.ROW_CREATED, b.ROW_ACTIVE)


def project(cur: sqlite3.Cursor, stored: StoredEvent, event: ev.Event) -> None:
    """Apply one event to the read models; rebuild replays the log through this same code."""
    batch_id = stored.stream_id.removeprefix("batch-")
    if isinstance(event, ev.BatchCreated):
        _insert_batch(cur, stored, event)
    else:
        _update_rows(cur, batch_id, event)
    _refresh_batch(cur, batch_id, stored)


def _insert_batch(cur: sqlite3.Cursor, stored: StoredEvent, event: ev.BatchCreated) -> None:
    cur.execute(
        "INSERT INTO batches (batch_id, file_name, idempotency_key, content_sha256, total_rows, "
        "status, stream_version, last_position, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.batch_id,
            event.file_name,
            event.idempotency_key,
            event.content_sha256,
            len(event.rows),
            b.PENDING,
            stored.stream_version,
            stored.global_position,
            stored.recorded_at,
            stored.recorded_at,
        ),
    )
    upstream_of = {row: u.creation_batch_id for u in event.upstream_batches for row in u.rows}
    cur.executemany(
        "INSERT INTO batch_rows (batch_id, row, line, name, address, phone, creation_batch_id, "
        "status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                event.batch_id,
                r.row,
                r.line,
                r.name,
                r.address,
                r.phone,
                upstream_of[r.row],
                b.ROW_PENDING,
            )
            for r in event.rows
        ],
    )


# The batches column that counts rows in each status (pending rows are not counted).
COUNTER = {
    b.ROW_CREATED: "created_rows",
    b.ROW_ACTIVE: "created_rows",
    b.ROW_FAILED: "failed_rows",
    b.ROW_DELETED: "deleted_rows",
}


def _set_row(cur: sqlite3.Cursor, batch_id: str, row: int, sql: str, *params: object) -> None:
    cur.execute(
        f"UPDATE batch_rows SET {sql} WHERE batch_id = ? AND row = ?", (*params, batch_id, row)
    )
    if cur.rowcount != 1:
        raise ValueError(f"batch {batch_id} has no row {row}")


def _move_row(
    cur: sqlite3.Cursor, batch_id: str, row: int, status: str, sql: str, *params: object
) -> None:
    """Give one row a new status, keeping the batch's counters in step."""
    found = cur.execute(
        "SELECT status FROM batch_rows WHERE batch_id = ? AND row = ?", (batch_id, row)
    ).fetchone()
    if found is None:
        raise ValueError(f"batch {batch_id} has no row {row}")
    _set_row(cur, batch_id, row, f"status = ?, {sql}", status, *params)
    _count(cur, batch_id, found[0], status, 1)


def _move_rows(
    cur: sqlite3.Cursor, batch_id: str, old: str, new: str, sql: str = "", *params: object
) -> None:
    """Give every row of one status another, keeping the counters in step."""
    sets = f"status = ?{', ' + sql if sql else ''}"
    cur.execute(
        f"UPDATE batch_rows SET {sets} WHERE batch_id = ? AND status = ?",
        (new, *params, batch_id, old),
    )
    _count(cur, batch_id, old, new, cur.rowcount)


def _count(cur: sqlite3.Cursor, batch_id: str, old: str, new: str, rows: int) -> None:
    if rows == 0 or COUNTER.get(old) == COUNTER.get(new):
        return
    sets = [
        f"{COUNTER[s]} = {COUNTER[s]} {sign} ?"
        for s, sign in ((old, "-"), (new, "+"))
        if s in COUNTER
    ]
    cur.execute(
        f"UPDATE batches SET {', '.join(sets)} WHERE batch_id = ?",
        (*[rows] * len(sets), batch_id),
    )


def _update_rows(cur: sqlite3.Cursor, batch_id: str, event: ev.Event) -> None:
    batch_sets = ""
    match event:
        case ev.HospitalRequested(row=row, attempt=attempt):
            _set_row(cur, batch_id, row, "attempts = ?", attempt)
            batch_sets = "requested = 1"
        case ev.HospitalRetryScheduled(row=row, reason=reason, message=message):
            _set_row(cur, batch_id, row, "error_reason = ?, error_message = ?", reason, message)
        case ev.HospitalCreated(row=row, hospital_id=hospital_id, reconciled=reconciled):
            _move_row(
                cur,
                batch_id,
                row,
                b.ROW_CREATED,
                "hospital_id = ?, reconciled = ?, error_reason = NULL, error_message = NULL",
                hospital_id,
                int(reconciled),
            )
        case ev.HospitalFailed(row=row, reason=reason, message=message):
            _move_row(
                cur,
                batch_id,
                row,
                b.ROW_FAILED,
                "error_reason = ?, error_message = ?",
                reason,
                message,
            )
        case ev.BatchActivated():
            _move_rows(cur, batch_id, b.ROW_CREATED, b.ROW_ACTIVE)
            batch_sets = "activated = 1"
        case ev.BatchActivationFailed(reason=reason):
            cur.execute(
                "UPDATE batches SET activation_error = ? WHERE batch_id = ?", (reason, batch_id)
            )
        case ev.BatchResumed(rows=rows):
            for row in rows:
                _move_row(
                    cur, batch_id, row, b.ROW_PENDING, "error_reason = NULL, error_message = NULL"
                )
            batch_sets = "activation_error = NULL"
        case ev.BatchRollbackRequested():
            batch_sets = "rollback_requested = 1"
        case ev.BatchRolledBack():
            for created in CREATED_STATUSES:
                _move_rows(cur, batch_id, created, b.ROW_DELETED)
            _move_rows(
                cur,
                batch_id,
                b.ROW_PENDING,
                b.ROW_FAILED,
                "error_reason = ?, error_message = ?",
                "rolled_back",
                b.ROLLED_BACK_MESSAGE,
            )
            batch_sets = "rolled_back = 1"
        case _:
            raise ValueError(f"{event.type_name} does not apply to an existing batch")
    if batch_sets:
        cur.execute(f"UPDATE batches SET {batch_sets} WHERE batch_id = ?", (batch_id,))


def _refresh_batch(cur: sqlite3.Cursor, batch_id: str, stored: StoredEvent) -> None:
    """Derive the status from the counters with the same rule as the domain fold."""
    (
        total,
        created,
        failed,
        deleted,
        requested,
        activated,
        activation_failed,
        rolled_back,
        finished_at,
    ) = cur.execute(
        "SELECT total_rows, created_rows, failed_rows, deleted_rows, requested, activated, "
        "activation_error IS NOT NULL, rolled_back, finished_at FROM batches WHERE batch_id = ?",
        (batch_id,),
    ).fetchone()
    status = b.derive_status(
        b.Counts(
            total=total,
            created=created,
            failed=failed,
            deleted=deleted,
            requested=bool(requested),
            activated=bool(activated),
            activation_failed=bool(activation_failed),
            rolled_back=bool(rolled_back),
        )
    )
    if status not in b.FINISHED:
        finished_at = None
    elif finished_at is None:
        finished_at = stored.recorded_at
    cur.execute(
        "UPDATE batches SET status = ?, stream_version = ?, last_position = ?, updated_at = ?, "
        "finished_at = ? WHERE batch_id = ?",
        (
            status,
            stored.stream_version,
            stored.global_position,
            stored.recorded_at,
            finished_at,
            batch_id,
        ),
    )


def write_fold(
    cur: sqlite3.Cursor, state: b.BatchState, updated_at: str, last_position: int
) -> None:
    """Write one batch's read-model rows straight from its fold (what rebuild does)."""
    counts = state.counts()
    cur.execute(
        "INSERT INTO batches (batch_id, file_name, idempotency_key, content_sha256, total_rows, "
        "created_rows, failed_rows, deleted_rows, requested, activated, activation_error, "
        "rollback_requested, rolled_back, status, stream_version, last_position, created_at, "
        "updated_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            state.batch_id,
            state.file_name,
            state.idempotency_key,
            state.content_sha256,
            counts.total,
            counts.created,
            counts.failed,
            counts.deleted,
            int(state.requested_any),
            int(state.activated),
            state.activation_failure,
            int(state.rollback_requested),
            int(state.rolled_back),
            state.status,
            state.version,
            last_position,
            state.created_at,
            updated_at,
            state.finished_at,
        ),
    )
    cur.executemany(
        "INSERT INTO batch_rows (batch_id, row, line, name, address, phone, creation_batch_id, "
        "status, hospital_id, error_reason, error_message, attempts, reconciled) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                state.batch_id,
                r.row.row,
                r.row.line,
                r.row.name,
                r.row.address,
                r.row.phone,
                r.creation_batch_id,
                b.row_status(r.status, state.activated),
                r.hospital_id,
                r.reason,
                r.error,
                r.attempts,
                int(r.reconciled),
            )
            for r in state.rows.values()
        ],
    )
