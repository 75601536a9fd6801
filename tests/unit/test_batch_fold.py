"""The batch fold: status rules, row statuses, and the decisions workers act on."""

from __future__ import annotations

import pytest

from service.domain import batch as b
from service.domain import events as ev
from service.domain.matching import pair
from service.processing.upstream import _stored_first

BATCH_ID = "6f1d4c1e-3b7a-4a53-9a39-0d6c2f0e8b11"


def rows(count: int) -> tuple[ev.Row, ...]:
    return tuple(
        ev.Row(n, f"Hospital {n}", f"{n} Main St", None, n + 1) for n in range(1, count + 1)
    )


def history(row_count: int, *events: ev.Event) -> b.BatchState:
    """Fold a batch of `row_count` rows through `events`; event i is recorded at 't<i>'."""
    created = b.plan(BATCH_ID, "f.csv", rows(row_count), batch_size=20, content_sha256="sha")
    return b.fold([(created, "t0"), *((e, f"t{i}") for i, e in enumerate(events, 1))])


def requested(row: int, attempt: int = 1) -> ev.HospitalRequested:
    return ev.HospitalRequested((row,), (attempt,))


def created(row: int) -> ev.HospitalCreated:
    return ev.HospitalCreated(row, 1000 + row)


def failed(row: int) -> ev.HospitalFailed:
    return ev.HospitalFailed(row, "rejected", f"row {row} refused", retryable=False)


ACTIVATED = ev.BatchActivated(2, (BATCH_ID,))


def numbers(rows: list[b.RowState]) -> list[int]:
    return [r.row.row for r in rows]


def test_new_batch_is_pending_with_every_row_to_create() -> None:
    state = history(3)

    assert (state.status, state.version, state.created_at) == (b.PENDING, 0, "t0")
    assert numbers(state.to_create()) == [1, 2, 3]
    assert state.to_reconcile() == []
    assert not state.ready_to_activate()
    assert state.unsettled()


def test_requested_row_is_reconciled_not_sent_again() -> None:
    state = history(2, requested(1))

    assert state.status == b.PROCESSING
    assert numbers(state.to_reconcile()) == [1]
    assert numbers(state.to_create()) == [2]


@pytest.mark.parametrize(("reason", "failures"), [("server_error", 1), (b.RATE_LIMITED, 0)])
def test_retry_scheduled_row_is_sent_again(reason: str, failures: int) -> None:
    state = history(1, requested(1), ev.HospitalRetryScheduled(1, 1, reason, "try later"))

    (row,) = state.to_create()
    assert (row.status, row.reason, row.error) == (b.ROW_PENDING, reason, "try later")
    assert row.failures == failures
    assert state.to_reconcile() == []


def test_batch_with_every_row_created_waits_for_activation() -> None:
    state = history(2, requested(1), created(1), requested(2), created(2))

    assert state.status == b.PROCESSING
    assert state.ready_to_activate()
    assert [b.row_status(r.status, state.activated) for r in state.rows.values()] == [
        b.ROW_CREATED,
        b.ROW_CREATED,
    ]


def test_activation_completes_the_batch_and_its_rows() -> None:
    state = history(2, requested(1), created(1), requested(2), created(2), ACTIVATED)

    assert (state.status, state.finished_at, state.activated) == (b.COMPLETED, "t5", True)
    assert {b.row_status(r.status, state.activated) for r in state.rows.values()} == {b.ROW_ACTIVE}
    assert not state.ready_to_activate()
    assert not state.unsettled()


def test_the_row_created_first_stays_first_through_a_resume() -> None:
    state = history(3, created(2), failed(1), created(3), ev.BatchResumed((1,)), created(1))

    assert state.first_created == 2
    assert history(3, failed(1)).first_created is None


def test_without_created_at_the_row_recorded_first_leads_activation() -> None:
    stamped = ev.HospitalCreated(1, 1001, created_at="2025-09-20T10:30:00.123456")

    # Records kept before created_at was: the row recorded first stands for the oldest.
    assert _stored_first(history(2, created(2), created(1))) == 2
    assert _stored_first(history(2, created(2), stamped)) == 2


@pytest.mark.parametrize(
    ("events", "status"),
    [
        ([created(1), failed(2)], b.PARTIALLY_COMPLETED),
        ([failed(1), failed(2)], b.FAILED),
        ([created(1), created(2), ev.BatchActivationFailed("not confirmed")], b.FAILED),
    ],
    ids=["some-created-some-failed", "none-created", "activation-failed"],
)
def test_finished_batch_status(events: list[ev.Event], status: str) -> None:
    state = history(2, *events)

    assert (state.status, state.finished_at) == (status, f"t{len(events)}")
    assert not state.ready_to_activate()


def test_a_row_that_failed_prevents_activation() -> None:
    assert not history(2, created(1), failed(2)).ready_to_activate()


def test_resume_returns_failed_rows_to_pending_and_reconciles_them_first() -> None:
    state = history(
        3, created(1), failed(2), failed(3), ev.BatchActivationFailed("x"), ev.BatchResumed((2, 3))
    )

    assert (state.status, state.finished_at, state.resumes) == (b.PROCESSING, None, 1)
    assert [r.status for r in state.rows.values()] == [b.ROW_CREATED, b.ROW_PENDING, b.ROW_PENDING]
    assert state.rows[2].error is None and state.activation_failure is None
    # A failed create may still have reached the directory.
    assert numbers(state.to_reconcile()) == [2, 3]
    assert state.to_create() == []


def test_resume_gives_a_row_that_gave_up_its_whole_budget_of_attempts_again() -> None:
    retry = ev.HospitalRetryScheduled(1, 1, b.UNREACHABLE, "cannot connect")
    gave_up = ev.HospitalFailed(1, b.UNREACHABLE, "gave up", retryable=True)
    state = history(1, requested(1), retry, requested(1, 2), gave_up)
    assert state.rows[1].failures == 1

    b.apply(state, ev.BatchResumed((1,)))

    # Else the resumed row would give up at its first failure, and wait its last backoff.
    assert state.rows[1].failures == 0


def test_a_row_recorded_without_created_at_holds_only_the_record_of_its_id() -> None:
    mine = history(1, requested(1), created(1)).rows[1].record  # no created_at: an old record
    hospital = {"name": "Hospital 1", "address": "1 Main St", "phone": None}
    restarted = {"id": 1, **hospital, "created_at": "2025-09-20T10:30:00.123456"}
    its_own = {**restarted, "id": 1001}

    # An identical hospital under another id (a restarted directory's) is left for a check
    # to claim for an identical row, not taken as this one's.
    assert pair([mine], [restarted]) == ([None], [restarted])
    assert pair([mine], [restarted, its_own]) == ([its_own], [restarted])


def test_rollback_request_stops_creates_and_activation() -> None:
    state = history(2, created(1), ev.BatchRollbackRequested())

    assert state.to_create() == []
    assert state.needs_rollback()
    assert not state.ready_to_activate()


def test_rollback_deletes_created_rows_and_fails_the_rest() -> None:
    state = history(
        3,
        created(1),
        failed(2),
        ev.BatchRollbackRequested(),
        ev.BatchRolledBack(1, (BATCH_ID,)),
    )

    assert [r.status for r in state.rows.values()] == [b.ROW_DELETED, b.ROW_FAILED, b.ROW_FAILED]
    assert state.rows[3].error == b.ROLLED_BACK_MESSAGE
    assert (state.status, state.counts().deleted) == (b.FAILED, 1)
    assert not state.needs_rollback()


def test_a_failed_rollback_stops_until_it_is_asked_for_again() -> None:
    state = history(1, created(1), ev.BatchRollbackRequested())
    assert state.needs_rollback() and state.unsettled()

    b.apply(state, ev.BatchRollbackFailed("HTTP 503"), "t4")
    assert state.rollback_failure == "HTTP 503"
    assert not state.needs_rollback() and not state.unsettled()
    assert state.rows[1].status == b.ROW_CREATED  # nothing is taken as deleted
    assert (state.status, state.finished_at) == (b.FAILED, "t4")  # it will not be activated

    b.apply(state, ev.BatchRollbackRequested(), "t5")
    assert state.rollback_failure is None and state.needs_rollback()
    assert state.rollback_requests == 2
    # Asked for again, it still will not be activated: failed, not partially completed.
    assert (state.status, state.finished_at) == (b.FAILED, "t4")


def test_a_batch_with_failed_rows_stays_failed_while_its_refused_rollback_is_retried() -> None:
    state = history(2, created(1), failed(2), ev.BatchRollbackRequested())
    assert state.status == b.PARTIALLY_COMPLETED  # until the rollback ends

    b.apply(state, ev.BatchRollbackFailed("HTTP 500"), "t5")
    b.apply(state, ev.BatchRollbackRequested(), "t6")

    assert state.status == b.FAILED and state.needs_rollback()


def test_rollback_of_an_activated_batch_deletes_its_rows() -> None:
    state = history(
        2,
        created(1),
        created(2),
        ACTIVATED,
        ev.BatchRollbackRequested(),
        ev.BatchRolledBack(2, (BATCH_ID,)),
    )

    assert {b.row_status(r.status, state.activated) for r in state.rows.values()} == {b.ROW_DELETED}
    assert (state.status, state.counts().deleted) == (b.FAILED, 2)


@pytest.mark.parametrize(
    ("counts", "status"),
    [
        (b.Counts(total=3, created=0, failed=0), b.PENDING),
        (b.Counts(total=3, created=0, failed=0, requested=True), b.PROCESSING),
        (b.Counts(total=3, created=2, failed=0), b.PROCESSING),
        (b.Counts(total=3, created=3, failed=0), b.PROCESSING),
        (b.Counts(total=3, created=3, failed=0, activated=True), b.COMPLETED),
        (b.Counts(total=3, created=2, failed=1), b.PARTIALLY_COMPLETED),
        (b.Counts(total=3, created=0, failed=3), b.FAILED),
        (b.Counts(total=3, created=3, failed=0, activation_failed=True), b.FAILED),
        (b.Counts(total=3, created=0, failed=1, deleted=2, rolled_back=True), b.FAILED),
        (b.Counts(total=3, created=3, failed=0, rollback_refused=True), b.FAILED),
        (
            b.Counts(total=3, created=3, failed=0, activated=True, rollback_refused=True),
            b.COMPLETED,
        ),
    ],
)
def test_derive_status(counts: b.Counts, status: str) -> None:
    assert b.derive_status(counts) == status


def test_fold_refuses_a_stream_not_started_by_batch_created() -> None:
    with pytest.raises(ValueError, match="starts with BatchCreated"):
        b.fold([(requested(1), None)])


def test_apply_refuses_a_second_batch_created() -> None:
    state = history(1)
    again = b.plan(BATCH_ID, "f.csv", rows(1), batch_size=20, content_sha256="sha")

    with pytest.raises(ValueError, match="does not apply"):
        b.apply(state, again)


def test_plan_splits_rows_into_upstream_batches_of_at_most_batch_size() -> None:
    small = b.plan(BATCH_ID, "f.csv", rows(20), batch_size=20, content_sha256="")
    large = b.plan(BATCH_ID, "f.csv", rows(45), batch_size=20, content_sha256="")

    assert [(u.creation_batch_id, len(u.rows)) for u in small.upstream_batches] == [(BATCH_ID, 20)]
    assert [len(u.rows) for u in large.upstream_batches] == [20, 20, 5]
    ids = [u.creation_batch_id for u in large.upstream_batches]
    assert len(set(ids)) == 3 and BATCH_ID not in ids
    assert b.plan(BATCH_ID, "f.csv", rows(45), batch_size=20, content_sha256="") == large
