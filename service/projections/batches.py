"""The `batches` and `batch_rows` read models, kept in the writer's transaction."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence

from service.domain import batch as b
from service.domain import events as ev
from service.store.records import StoredEvent

CREATED_STATUSES = (b.ROW_CREATED, b.ROW_ACTIVE)


def project(cur: sqlite3.Cursor, appended: Sequence[StoredEvent]) -> None:
    """Apply one append's events (one stream's) to the read models, then derive the status:
    at the end, and after each event that may have reopened a finished batch."""
    batch = _Batch(cur, appended[0].stream_id.removeprefix(b.STREAM_PREFIX))
    for stored in appended:
        event = stored.decode()
        if isinstance(event, ev.BatchCreated):
            _insert_batch(cur, stored, event)
            continue
        batch.apply(event)
        if batch.may_reopen and stored is not appended[-1]:
            # The fold dates `finished_at` event by event: a batch reopened here and finished
            # again by a later event of this append finished now, not when it first did.
            batch.finish(stored)
    batch.finish(appended[-1])


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
    upstream_of = event.creation_batch_of()
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


class _Batch:
    """One append's changes to one batch: rows at once; counters and status by `finish`."""

    def __init__(self, cur: sqlite3.Cursor, batch_id: str) -> None:
        self.cur, self.batch_id = cur, batch_id
        self.counts: Counter[str] = Counter()  # change of each counter column
        self.values: dict[str, object] = {}  # columns given a new value
        # Set by what can take a finished batch back to work: a row leaving a status other
        # than pending (a failed row resumed or created after all), or a cleared failure.
        self.may_reopen = False

    def apply(self, event: ev.Event) -> None:
        match event:
            case (
                ev.HospitalRequested(rows=rows, attempts=attempts)
                | ev.LogLossDetected(rows=rows, attempts=attempts)
            ):
                self.cur.executemany(
                    "UPDATE batch_rows SET attempts = ? WHERE batch_id = ? AND row = ?",
                    [
                        (attempt, self.batch_id, n)
                        for n, attempt in zip(rows, attempts, strict=True)
                    ],
                )
                if self.cur.rowcount != len(rows):
                    raise ValueError(f"batch {self.batch_id} lacks some of the rows {rows}")
                self.values["requested"] = 1
            case ev.HospitalRetryScheduled(row=row, reason=reason, message=message):
                self._set_row(row, "error_reason = ?, error_message = ?", reason, message)
            case ev.HospitalCreated(row=row, hospital_id=hospital_id, reconciled=reconciled):
                self._move_row(
                    row,
                    b.ROW_CREATED,
                    "hospital_id = ?, reconciled = ?, error_reason = NULL, error_message = NULL",
                    hospital_id,
                    int(reconciled),
                )
            case ev.HospitalFailed(row=row, reason=reason, message=message):
                self._move_row(
                    row, b.ROW_FAILED, "error_reason = ?, error_message = ?", reason, message
                )
            case ev.BatchActivated():
                self._move_rows(b.ROW_CREATED, b.ROW_ACTIVE)
                self.values["activated"] = 1
            case ev.BatchActivationFailed(reason=reason, activated_upstream_batch_ids=took):
                self.values["activation_error"] = reason
                if took:
                    self._move_rows(b.ROW_CREATED, b.ROW_ACTIVE, of=took)
            case ev.BatchResumed(rows=rows):
                for row in rows:
                    self._move_row(row, b.ROW_PENDING, "error_reason = NULL, error_message = NULL")
                self.values["activation_error"] = None
                self.may_reopen = True
            case ev.BatchRollbackRequested():
                self.values["rollback_requested"] = 1
                self.values["rollback_error"] = None
                self.may_reopen = True
            case ev.BatchRollbackFailed(reason=reason, deleted_upstream_batch_ids=gone):
                self.values["rollback_error"] = reason
                self.values["rollback_refused"] = 1
                self._end_rollback(gone, b.ROLLBACK_ASKED, b.ROLLBACK_ASKED_MESSAGE)
            case ev.BatchRolledBack():
                self._end_rollback(None, b.ROLLED_BACK, b.ROLLED_BACK_MESSAGE)
                self.values["rolled_back"] = 1
            case _:
                raise ValueError(f"{event.type_name} does not apply to an existing batch")

    def _set_row(self, row: int, sql: str, *params: object) -> None:
        self.cur.execute(
            f"UPDATE batch_rows SET {sql} WHERE batch_id = ? AND row = ?",
            (*params, self.batch_id, row),
        )
        if self.cur.rowcount != 1:
            raise ValueError(f"batch {self.batch_id} has no row {row}")

    def _move_row(self, row: int, status: str, sql: str, *params: object) -> None:
        """Give one row a new status, counting the change."""
        # Rows mostly leave pending: try that first, and look the old status up otherwise.
        self.cur.execute(
            f"UPDATE batch_rows SET status = ?, {sql} WHERE batch_id = ? AND row = ? "
            "AND status = ?",
            (status, *params, self.batch_id, row, b.ROW_PENDING),
        )
        if self.cur.rowcount == 1:
            self._count(b.ROW_PENDING, status, 1)
            return
        found = self.cur.execute(
            "SELECT status FROM batch_rows WHERE batch_id = ? AND row = ?", (self.batch_id, row)
        ).fetchone()
        if found is None:
            raise ValueError(f"batch {self.batch_id} has no row {row}")
        self._set_row(row, f"status = ?, {sql}", status, *params)
        self._count(found[0], status, 1)
        self.may_reopen = True

    def _move_rows(
        self, old: str, new: str, sql: str = "", *params: object, of: Sequence[str] | None = None
    ) -> None:
        """Give every row of one status (of the upstream batches `of`, if given) another,
        counting the change."""
        sets = f"status = ?{', ' + sql if sql else ''}"
        only = "" if of is None else f" AND creation_batch_id IN ({', '.join('?' * len(of))})"
        self.cur.execute(
            f"UPDATE batch_rows SET {sets} WHERE batch_id = ? AND status = ?{only}",
            (new, *params, self.batch_id, old, *(of or ())),
        )
        self._count(old, new, self.cur.rowcount)

    def _end_rollback(self, deleted: Sequence[str] | None, reason: str, message: str) -> None:
        """Rows when a rollback round ends: created ones of the `deleted` upstream batches (all
        when None) read deleted, and rows never sent read failed."""
        for created in CREATED_STATUSES:
            self._move_rows(created, b.ROW_DELETED, of=deleted)
        sql = "error_reason = ?, error_message = ?"
        self._move_rows(b.ROW_PENDING, b.ROW_FAILED, sql, reason, message)

    def _count(self, old: str, new: str, rows: int) -> None:
        if old in COUNTER:
            self.counts[COUNTER[old]] -= rows
        if new in COUNTER:
            self.counts[COUNTER[new]] += rows

    def finish(self, last: StoredEvent) -> None:
        """Write the counters and values so far, then derive the status with the fold's rule."""
        sets = [f"{column} = {column} + ?" for column in self.counts]
        sets += [f"{column} = ?" for column in self.values]
        sets += ["stream_version = ?", "last_position = ?", "updated_at = ?"]
        params = [*self.counts.values(), *self.values.values()]
        params += [last.stream_version, last.global_position, last.recorded_at, self.batch_id]
        found = self.cur.execute(
            f"UPDATE batches SET {', '.join(sets)} WHERE batch_id = ? RETURNING total_rows, "
            "created_rows, failed_rows, deleted_rows, requested, activated, "
            "activation_error IS NOT NULL, rolled_back, rollback_refused, finished_at",
            params,
        ).fetchone()
        if found is None:
            raise ValueError(f"batch {self.batch_id} does not exist")
        *counts, finished_at = found
        status = b.derive_status(b.Counts(*counts[:4], *map(bool, counts[4:])))
        if status not in b.FINISHED:
            finished_at = None
        elif finished_at is None:
            finished_at = last.recorded_at
        self.cur.execute(
            "UPDATE batches SET status = ?, finished_at = ? WHERE batch_id = ?",
            (status, finished_at, self.batch_id),
        )
        self.counts.clear()
        self.values.clear()
        self.may_reopen = False


def write_fold(
    cur: sqlite3.Cursor, state: b.BatchState, updated_at: str, last_position: int
) -> None:
    """Write one batch's read-model rows straight from its fold (what rebuild does)."""
    counts = state.counts()
    cur.execute(
        "INSERT INTO batches (batch_id, file_name, idempotency_key, content_sha256, total_rows, "
        "created_rows, failed_rows, deleted_rows, requested, activated, activation_error, "
        "rollback_requested, rollback_error, rollback_refused, rolled_back, status, "
        "stream_version, last_position, created_at, updated_at, finished_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            state.rollback_failure,
            int(state.rollback_refused),
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
                b.row_status(r.status, state.row_activated(r)),
                r.hospital_id,
                r.reason,
                r.error,
                r.attempts,
                int(r.reconciled),
            )
            for r in state.rows.values()
        ],
    )
