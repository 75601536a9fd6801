"""A batch as a fold over its events, the status rules, and the decisions workers act on."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from service.domain import events as ev
from service.domain.matching import HospitalRecord

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
PARTIALLY_COMPLETED = "partially_completed"
FAILED = "failed"
BATCH_STATUSES = (PENDING, PROCESSING, COMPLETED, PARTIALLY_COMPLETED, FAILED)
FINISHED = (COMPLETED, PARTIALLY_COMPLETED, FAILED)

ROW_PENDING = "pending"
ROW_CREATED = "created"
ROW_ACTIVE = "created_and_activated"
ROW_FAILED = "failed"
ROW_DELETED = "deleted"
ROW_STATUSES = (ROW_PENDING, ROW_CREATED, ROW_ACTIVE, ROW_FAILED, ROW_DELETED)

# Failure reasons recorded in HospitalFailed / HospitalRetryScheduled.
RATE_LIMITED = "rate_limited"
WITHDRAWN = "withdrawn"  # a ready create was not sent after all (rollback, or the pool stopping)
NOT_FAILURES = (RATE_LIMITED, WITHDRAWN)  # retries that do not count towards max_attempts
REJECTED = "rejected"  # the directory refused the row: sending it again gives the same
UNREACHABLE = "unreachable"  # the create provably never reached the directory
NOT_STORED = "not_stored"  # a create that may have reached it was not found there
UNCONFIRMED = "unconfirmed"  # the directory could not be read to look for the row
ROLLBACK_ASKED = "rollback_asked"  # never sent: a rollback was asked for first
ROLLED_BACK = "rolled_back"  # never sent: the batch was rolled back first
ROLLED_BACK_MESSAGE = "not created: the batch was rolled back first"
ROLLBACK_ASKED_MESSAGE = "not created: a rollback was asked for first"


STREAM_PREFIX = "batch-"


def stream_id(batch_id: str) -> str:
    """The event stream that holds one batch's history."""
    return STREAM_PREFIX + batch_id


class Counts(NamedTuple):
    """The numbers status is derived from; shared by the fold and the read model."""

    total: int
    created: int
    failed: int
    deleted: int = 0
    requested: bool = False
    activated: bool = False
    activation_failed: bool = False
    rolled_back: bool = False
    rollback_refused: bool = False


def derive_status(c: Counts) -> str:
    """Status is never stored as a fact: it follows from the counts."""
    if c.rolled_back:
        return FAILED
    if c.activated:
        return COMPLETED
    finished = c.created + c.failed + c.deleted == c.total
    # A refused rollback still stands, and while it is asked for again: the batch will not
    # be activated, as after a failure.
    if (finished and c.created == 0) or c.activation_failed or c.rollback_refused:
        return FAILED
    if finished and c.failed:
        return PARTIALLY_COMPLETED
    if not c.requested and c.created + c.failed == 0:
        return PENDING
    return PROCESSING


def row_status(base: str, activated: bool) -> str:
    """A created row reads created_and_activated once its batch is activated."""
    return ROW_ACTIVE if base == ROW_CREATED and activated else base


@dataclass
class RowState:
    """One row of a batch as its events leave it."""

    row: ev.Row
    creation_batch_id: str
    status: str = ROW_PENDING
    hospital_id: int | None = None
    created_at: str | None = None  # the directory's, for its record of the row
    error: str | None = None
    reason: str | None = None
    attempts: int = 0
    failures: int = 0  # attempts that provably failed, NOT_FAILURES aside
    may_exist: bool = False  # a create may have reached the directory; no outcome yet
    reconciled: bool = False

    @property
    def record(self) -> HospitalRecord:
        """The directory's record of the row, once it is created."""
        return HospitalRecord(self.hospital_id, self.created_at, *self.row.values)


@dataclass
class BatchState:
    """A batch as its events leave it: the fold that status and every decision read."""

    batch_id: str
    file_name: str
    upstream: tuple[ev.UpstreamBatch, ...]
    rows: dict[int, RowState]
    idempotency_key: str | None = None
    content_sha256: str = ""
    version: int = -1
    created_at: str | None = None
    finished_at: str | None = None
    activated: bool = False
    activated_upstream: set[str] = field(default_factory=set)  # took before a failure
    activation_failure: str | None = None
    rollback_requested: bool = False
    rollback_requests: int = 0
    rollback_failure: str | None = None  # the last rollback's, until it is asked for again
    rollback_refused: bool = False  # a rollback was ever refused
    rolled_back: bool = False
    resumes: int = 0
    requested_any: bool = False
    first_created: int | None = None  # the row created first: activation looks there first
    derived_status: str = ""  # kept by apply, so the fold derives it once per event
    tally: Counter[str] = field(default_factory=Counter)  # rows by status

    def counts(self) -> Counts:
        """The counters status is derived from."""
        return Counts(
            total=len(self.rows),
            created=self.tally[ROW_CREATED],
            failed=self.tally[ROW_FAILED],
            deleted=self.tally[ROW_DELETED],
            requested=self.requested_any,
            activated=self.activated,
            activation_failed=self.activation_failure is not None,
            rolled_back=self.rolled_back,
            rollback_refused=self.rollback_refused,
        )

    def set_status(self, row: RowState, status: str) -> None:
        """Change a row's status and keep the tally that status is derived from."""
        self.tally[row.status] -= 1
        self.tally[status] += 1
        row.status = status

    @property
    def status(self) -> str:
        return self.derived_status or derive_status(self.counts())

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def row_activated(self, row: RowState) -> bool:
        """Whether the row's hospital was activated: with its batch, or with its upstream
        batch before the batch's activation failed."""
        return self.activated or row.creation_batch_id in self.activated_upstream

    def rows_of(self, creation_batch_id: str) -> list[RowState]:
        """The rows sent under one upstream batch id."""
        return [r for r in self.rows.values() if r.creation_batch_id == creation_batch_id]

    def to_create(self) -> list[RowState]:
        """Rows never sent, or proven not stored: safe to send a create for."""
        if self.rollback_requested:
            return []
        return [r for r in self.rows.values() if r.status == ROW_PENDING and not r.may_exist]

    def to_reconcile(self) -> list[RowState]:
        """Rows with a create intent and no outcome: look in the directory before re-sending."""
        return [r for r in self.rows.values() if r.status == ROW_PENDING and r.may_exist]

    def ready_to_activate(self) -> bool:
        """Activate once, only when every row exists: the directory's activation is one-shot."""
        return (
            not self.activated
            and not self.rollback_requested
            and self.activation_failure is None
            and all(r.status == ROW_CREATED for r in self.rows.values())
        )

    def needs_rollback(self) -> bool:
        """A rollback was asked for, and has neither been carried out nor failed since."""
        return self.rollback_requested and not self.rolled_back and self.rollback_failure is None

    def unsettled(self) -> bool:
        """Work the service still owes this batch (creates, activation or rollback)."""
        return (
            bool(self.to_create() or self.to_reconcile())
            or self.ready_to_activate()
            or self.needs_rollback()
        )


def start(event: ev.BatchCreated, recorded_at: str | None = None) -> BatchState:
    """The state right after a batch was accepted."""
    upstream_of = event.creation_batch_of()
    state = BatchState(
        batch_id=event.batch_id,
        file_name=event.file_name,
        upstream=event.upstream_batches,
        rows={r.row: RowState(row=r, creation_batch_id=upstream_of[r.row]) for r in event.rows},
        idempotency_key=event.idempotency_key,
        content_sha256=event.content_sha256,
        version=0,
        created_at=recorded_at,
    )
    state.tally.update(dict.fromkeys(ROW_STATUSES, 0))  # no key missing: counts() stays cheap
    state.tally[ROW_PENDING] = len(state.rows)
    return state


def apply(state: BatchState, event: ev.Event, recorded_at: str | None = None) -> BatchState:
    """Fold one more event into the state (in place) and return it."""
    was_finished = state.finished
    state.derived_status = ""
    match event:
        # After a loss, rows the log reads as unsent may have been sent: as after an intent.
        case (
            ev.HospitalRequested(rows=rows, attempts=attempts)
            | ev.LogLossDetected(rows=rows, attempts=attempts)
        ):
            for n, attempt in zip(rows, attempts, strict=True):
                row = state.rows[n]
                row.may_exist, row.attempts = True, attempt
            state.requested_any = True
        case ev.HospitalRetryScheduled(row=n, reason=reason, message=message):
            row = state.rows[n]
            row.may_exist, row.error, row.reason = False, message, reason
            if reason not in NOT_FAILURES:
                row.failures += 1
        case ev.HospitalCreated(
            row=n, hospital_id=hid, reconciled=reconciled, created_at=created_at
        ):
            row = state.rows[n]
            state.set_status(row, ROW_CREATED)
            row.hospital_id, row.created_at, row.reconciled = hid, created_at, reconciled
            row.may_exist, row.error, row.reason = False, None, None
            if state.first_created is None:
                state.first_created = n
        case ev.HospitalFailed(row=n, reason=reason, message=message):
            row = state.rows[n]
            state.set_status(row, ROW_FAILED)
            row.error, row.reason, row.may_exist = message, reason, False
        case ev.BatchActivated():
            state.activated = True
        case ev.BatchActivationFailed(reason=reason, activated_upstream_batch_ids=took):
            state.activation_failure = reason
            state.activated_upstream.update(took)
        case ev.BatchResumed(rows=rows):
            for n in rows:
                # A failed row may still have reached the directory: check before re-sending.
                row = state.rows[n]
                state.set_status(row, ROW_PENDING)
                row.error, row.reason, row.may_exist, row.failures = None, None, True, 0
            state.activation_failure = None
            state.resumes += 1
        case ev.BatchRollbackRequested():
            state.rollback_requested, state.rollback_failure = True, None
            state.rollback_requests += 1
        case ev.BatchRollbackFailed(reason=reason, deleted_upstream_batch_ids=gone):
            state.rollback_failure, state.rollback_refused = reason, True
            # The rollback still stands, so rows never sent never will be.
            _end_rollback(state, gone, ROLLBACK_ASKED, ROLLBACK_ASKED_MESSAGE)
        case ev.BatchRolledBack():
            state.rolled_back = True
            _end_rollback(state, None, ROLLED_BACK, ROLLED_BACK_MESSAGE)
        case _:
            raise ValueError(f"{event.type_name} does not apply to an existing batch")
    state.version += 1
    state.derived_status = derive_status(state.counts())
    if state.finished and not was_finished:
        state.finished_at = recorded_at
    elif not state.finished:
        state.finished_at = None
    return state


def _end_rollback(
    state: BatchState, deleted: Collection[str] | None, reason: str, message: str
) -> None:
    """Rows when a rollback round ends: created ones of the `deleted` upstream batches (all
    when None) read deleted, and rows never sent read failed."""
    for row in state.rows.values():
        if row.status == ROW_CREATED and (deleted is None or row.creation_batch_id in deleted):
            state.set_status(row, ROW_DELETED)
        elif row.status == ROW_PENDING:
            state.set_status(row, ROW_FAILED)
            row.error, row.reason = message, reason


def fold(history: Iterable[tuple[ev.Event, str | None]]) -> BatchState:
    """Replay a batch's history (event, recorded_at) from its BatchCreated on."""
    items = iter(history)
    first, recorded_at = next(items)
    if not isinstance(first, ev.BatchCreated):
        raise ValueError(f"a batch stream starts with BatchCreated, not {first.type_name}")
    state = start(first, recorded_at)
    for event, at in items:
        apply(state, event, at)
    return state


def plan(
    batch_id: str,
    file_name: str,
    rows: tuple[ev.Row, ...],
    batch_size: int,
    content_sha256: str,
    idempotency_key: str | None = None,
) -> ev.BatchCreated:
    """Accept a file: split its rows into upstream batches of at most `batch_size`.

    A file that fits in one upstream batch uses its own batch_id upstream; the slices of
    a larger file get ids derived from it, so the plan is the same however often it is made.
    """
    upstream: tuple[ev.UpstreamBatch, ...]
    if len(rows) <= batch_size:
        upstream = (ev.UpstreamBatch(batch_id, tuple(r.row for r in rows)),)
    else:
        upstream = tuple(
            ev.UpstreamBatch(
                str(uuid.uuid5(uuid.UUID(batch_id), f"upstream-{i // batch_size}")),
                tuple(r.row for r in rows[i : i + batch_size]),
            )
            for i in range(0, len(rows), batch_size)
        )
    return ev.BatchCreated(
        batch_id=batch_id,
        file_name=file_name,
        rows=rows,
        upstream_batches=upstream,
        content_sha256=content_sha256,
        idempotency_key=idempotency_key,
    )
