"""Read models: equal to a rebuild from the log and to the domain fold, and repairable."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.domain import batch as b
from service.domain import events as ev
from service.projections import batches, queries
from service.projections.rebuild import rebuild
from service.store.event_store import EventStore
from service.store.records import NewEvent
from tests.integration.conftest import batch_created, new_batch, requested, run_sql


@dataclass
class Model:
    """What the test knows of one batch, to offer only valid next events.

    Rollbacks and resumes are limited per batch, or few histories would end finished.
    """

    created: ev.BatchCreated
    rows: dict[int, str]  # new, sent (may exist upstream), created, failed
    may_roll_back: bool
    resumes_left: int
    attempts: Counter[int] = field(default_factory=Counter)
    activated: bool = False
    activation_failed: bool = False
    rollback: bool = False
    rollback_failed: bool = False
    rolled_back: bool = False

    def next_events(self) -> dict[str, list[ev.Event]]:
        """The valid next events, by kind."""
        upstream = tuple(u.creation_batch_id for u in self.created.upstream_batches)
        created = [n for n, s in self.rows.items() if s == "created"]
        failed = tuple(n for n, s in self.rows.items() if s == "failed")
        rows_in = {state: [n for n, s in self.rows.items() if s == state] for state in STATES}
        if self.rolled_back or (self.activated and not self.may_roll_back):
            return {}
        if self.rollback_failed:
            return {"rollback": [ev.BatchRollbackRequested()]}
        if self.rollback:
            return {
                "rollback": [ev.BatchRolledBack(len(created), upstream)],
                "rollback_failed": [  # refused at once, or after the first upstream batch went
                    ev.BatchRollbackFailed("HTTP 503"),
                    ev.BatchRollbackFailed("HTTP 503", upstream[:1]),
                ],
            }
        if self.activated:
            return {"rollback": [ev.BatchRollbackRequested()]}
        new = rows_in["new"]
        requests: list[ev.Event] = [
            ev.HospitalRequested((n,), (self.attempts[n] + 1,)) for n in new
        ]
        if len(new) > 1:  # every new row at once, as workers that take rows together record them
            requests.append(
                ev.HospitalRequested(tuple(new), tuple(self.attempts[n] + 1 for n in new))
            )
        loss = ev.LogLossDetected(tuple(new), tuple(self.attempts[n] + 1 for n in new), 5, 9)
        options: dict[str, list[ev.Event]] = {
            "request": requests,
            "loss": [loss] if new else [],
            "create": [
                ev.HospitalCreated(n, 1000 + n, reconciled=n % 2 == 0) for n in rows_in["sent"]
            ],
            "retry": [
                ev.HospitalRetryScheduled(n, self.attempts[n], "server_error", "503")
                for n in rows_in["sent"]
            ],
            "fail": [
                ev.HospitalFailed(n, "rejected", f"row {n} refused", False)
                for n in rows_in["new"] + rows_in["sent"]
            ],
            "rollback": [ev.BatchRollbackRequested()] if self.may_roll_back else [],
        }
        if len(created) == len(self.rows) and not self.activation_failed:
            options["activate"] = [ev.BatchActivated(len(created), upstream)]
            options["activation_failed"] = [ev.BatchActivationFailed("not confirmed")]
        if (failed or self.activation_failed) and self.resumes_left:
            options["resume"] = [ev.BatchResumed(failed)]
        return {kind: events for kind, events in options.items() if events}

    def apply(self, event: ev.Event) -> None:
        match event:
            case ev.HospitalRequested(rows=rows) | ev.LogLossDetected(rows=rows):
                for n in rows:
                    self.rows[n] = "sent"
                    self.attempts[n] += 1
            case ev.HospitalRetryScheduled(row=n):
                self.rows[n] = "new"
            case ev.HospitalCreated(row=n):
                self.rows[n] = "created"
            case ev.HospitalFailed(row=n):
                self.rows[n] = "failed"
            case ev.BatchActivated():
                self.activated = True
            case ev.BatchActivationFailed():
                self.activation_failed = True
            case ev.BatchResumed(rows=rows):
                self.rows.update(dict.fromkeys(rows, "sent"))  # they may exist upstream
                self.activation_failed = False
                self.resumes_left -= 1
            case ev.BatchRollbackRequested():
                self.rollback, self.rollback_failed = True, False
            case ev.BatchRollbackFailed():
                self.rollback_failed = True
            case ev.BatchRolledBack():
                self.rolled_back = True


STATES = ("new", "sent", "created", "failed")
# Kinds repeated to make them likelier: batches should often get far enough to finish.
KIND_WEIGHTS = (("request",) * 6 + ("create",) * 6 + ("fail",) * 2 + ("activate",) * 2) + (
    "retry",
    "loss",
    "resume",
    "activation_failed",
    "activation_failed",
    "rollback",
    "rollback_failed",
)


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, list[ev.Event]]]:
    """Appends (batch id, events) of valid histories of one to three interleaved batches."""
    models = []
    for i in range(draw(st.integers(1, 3))):
        created = batch_created(f"b{i}", rows=draw(st.integers(1, 25)))
        rows = dict.fromkeys((r.row for r in created.rows), "new")
        may_roll_back, resumes = draw(st.booleans()), draw(st.integers(0, 2))
        models.append(Model(created, rows, may_roll_back=may_roll_back, resumes_left=resumes))
    appends: list[tuple[str, list[ev.Event]]] = [(m.created.batch_id, [m.created]) for m in models]
    for _ in range(draw(st.integers(0, 60))):
        model = draw(st.sampled_from(models))
        events: list[ev.Event] = []
        for _ in range(draw(st.integers(1, 4))):
            options = model.next_events()
            kinds = [kind for kind in KIND_WEIGHTS if kind in options]
            if not kinds:
                break
            events.append(draw(st.sampled_from(options[draw(st.sampled_from(kinds))])))
            model.apply(events[-1])
        if events:
            appends.append((model.created.batch_id, events))
    return appends


def fold_view(state: b.BatchState) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The domain fold in the shape of the read models."""
    counts = state.counts()
    summary = {
        "status": state.status,
        "total_rows": counts.total,
        "created_rows": counts.created,
        "failed_rows": counts.failed,
        "deleted_rows": counts.deleted,
        "activated": int(state.activated),
        "activation_error": state.activation_failure,
        "rollback_requested": int(state.rollback_requested),
        "rollback_error": state.rollback_failure,
        "rollback_refused": int(state.rollback_refused),
        "rolled_back": int(state.rolled_back),
        "stream_version": state.version,
        "created_at": state.created_at,
        "finished_at": state.finished_at,
    }
    rows = [
        {
            "row": n,
            "creation_batch_id": r.creation_batch_id,
            "status": b.row_status(r.status, state.activated),
            "hospital_id": r.hospital_id,
            "error_reason": r.reason,
            "error_message": r.error,
            "attempts": r.attempts,
            "reconciled": int(r.reconciled),
        }
        for n, r in sorted(state.rows.items())
    ]
    return summary, rows


def pick(row: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """`row` restricted to the keys of `like`."""
    return {key: row[key] for key in like}


def story(rows: int, *appends: list[ev.Event]) -> list[tuple[str, list[ev.Event]]]:
    """A fixed history of batch "s" for @example: paths random histories seldom take."""
    return [("s", [batch_created("s", rows)]), *(("s", events) for events in appends)]


REQUEST_1, CREATE_1 = ev.HospitalRequested((1,), (1,)), ev.HospitalCreated(1, 1001)
ROLLBACK = [ev.BatchRollbackRequested(), ev.BatchRolledBack(1, ("s",))]
FAIL_1 = ev.HospitalFailed(1, "rejected", "no", False)
REFUSED: list[ev.Event] = [ev.BatchRollbackFailed("HTTP 503", ())]


@example(story(1, [REQUEST_1, CREATE_1], [ev.BatchActivationFailed("ko"), ev.BatchResumed(())]))
# A resume that only clears a failed activation reopens its batch within the append too.
@example(
    story(
        1,
        [REQUEST_1, CREATE_1, ev.BatchActivationFailed("ko")],
        [ev.BatchResumed(()), ev.BatchActivated(1, ("s",))],
    )
)
@example(story(1, [REQUEST_1, CREATE_1, ev.BatchActivated(1, ("s",))], ROLLBACK))
# A refused rollback fails the batch; asked again, it reopens and finishes anew.
@example(story(1, [REQUEST_1, CREATE_1, ev.BatchRollbackRequested()], REFUSED, ROLLBACK))
# A failed row created after all reopens its batch within the append that fails it again.
@example(story(1, [REQUEST_1, FAIL_1], [CREATE_1, ev.BatchActivationFailed("ko")]))
@example(
    story(
        2,
        [REQUEST_1, CREATE_1, ev.HospitalFailed(2, "rejected", "no", False)],
        [ev.BatchResumed((2,))],
        ROLLBACK,
    )
)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # one db file per example
)
@given(history=histories())
async def test_read_models_equal_the_fold_and_a_rebuild(
    tmp_path: Path, history: list[tuple[str, list[ev.Event]]]
) -> None:
    path = tmp_path / f"{uuid.uuid4()}.db"
    store = EventStore(path, projectors=[batches.project])
    await store.open()
    try:
        for batch_id, events in history:
            await store.append(b.stream_id(batch_id), None, [NewEvent(e) for e in events])
        for batch_id in {batch_id for batch_id, _ in history}:
            stored = await store.read_stream(b.stream_id(batch_id))
            summary, rows = fold_view(b.fold((e.decode(), e.recorded_at) for e in stored))
            assert pick(await queries.get_batch(store, batch_id) or {}, summary) == summary
            read = queries.row_dicts(await queries.get_row_values(store, batch_id))
            assert [pick(r, rows[0]) for r in read] == rows
    finally:
        await store.close()

    assert rebuild(str(path)).equal


async def test_rebuild_with_replace_repairs_a_corrupted_read_model(
    store: EventStore, store_path: Path
) -> None:
    await store.append("batch-a", -1, new_batch("a", rows=3) + requested("a"))
    await store.append("batch-b", -1, new_batch("b"))
    before = await queries.get_batch(store, "a")
    run_sql(store_path, "UPDATE batches SET created_rows = 999 WHERE batch_id = 'a'")

    checked = rebuild(str(store_path))
    repaired = rebuild(str(store_path), replace=True)

    assert (checked.equal, checked.replaced, checked.differences["batches"]) == (False, False, 2)
    assert (repaired.replaced, repaired.events) == (True, 3)
    assert await queries.get_batch(store, "a") == before
    assert rebuild(str(store_path)).equal


async def test_a_rebuild_split_among_processes_checks_every_share(
    store: EventStore, store_path: Path
) -> None:
    for name in ("a", "b", "c", "d"):
        await store.append(f"batch-{name}", -1, new_batch(name, rows=3) + requested(name))
    healthy = rebuild(str(store_path), workers=3)
    run_sql(store_path, "UPDATE batches SET created_rows = 999 WHERE batch_id = 'a'")
    run_sql(store_path, "DELETE FROM batch_rows WHERE batch_id = 'd' AND row = 2")
    run_sql(store_path, "UPDATE projection_checkpoints SET position = 1")

    split, whole = rebuild(str(store_path), workers=3), rebuild(str(store_path), workers=1)

    assert (healthy.equal, healthy.events) == (True, 8)
    expected = {"batches": 2, "batch_rows": 1, "projection_checkpoints": 2}
    assert split.differences == whole.differences == expected
    assert split.events == whole.events == 8


async def test_rebuild_of_a_healthy_log_replaces_nothing(
    store: EventStore, store_path: Path
) -> None:
    await store.append("batch-a", -1, new_batch("a") + requested("a", 2))

    report = rebuild(str(store_path), replace=True)

    assert (report.equal, report.replaced, report.events) == (True, False, 3)


async def test_rebuild_during_appends_compares_one_snapshot(
    store: EventStore, store_path: Path
) -> None:
    async def append_many(n: int) -> None:
        await store.append(f"batch-{n}", -1, new_batch(str(n)))
        for _ in range(20):
            await store.append(f"batch-{n}", None, requested(str(n)))

    appending = asyncio.gather(*(append_many(n) for n in range(10)))
    reports = [await asyncio.to_thread(rebuild, str(store_path)) for _ in range(3)]
    await appending

    assert all(r.equal for r in reports)
    assert rebuild(str(store_path)).events == 210


async def test_batch_created_projects_a_pending_batch_and_its_rows(store: EventStore) -> None:
    created = dataclasses.replace(batch_created("a", rows=25), idempotency_key="key-1")
    await store.append("batch-a", -1, [NewEvent(created)])

    summary = await queries.get_batch(store, "a")
    rows = queries.row_dicts(await queries.get_row_values(store, "a"))

    assert summary is not None
    assert (summary["status"], summary["total_rows"], summary["stream_version"]) == (
        "pending",
        25,
        0,
    )
    assert [r["row"] for r in rows] == list(range(1, 26))
    assert {r["creation_batch_id"] for r in rows[:20]} == {"a-0"}
    assert {r["creation_batch_id"] for r in rows[20:]} == {"a-1"}


async def test_unfinished_batches_are_the_ones_still_owed_work(store: EventStore) -> None:
    await store.append("batch-pending", -1, new_batch("pending", rows=1))
    await store.append("batch-done", -1, new_batch("done", rows=1))
    await store.append("batch-done", 0, [NewEvent(ev.HospitalFailed(1, "rejected", "no", False))])
    await store.append("batch-undo", -1, new_batch("undo", rows=1))
    await store.append(
        "batch-undo",
        0,
        [
            NewEvent(ev.HospitalFailed(1, "rejected", "no", False)),
            NewEvent(ev.BatchRollbackRequested()),
        ],
    )

    assert await queries.unfinished_batch_ids(store) == ["pending", "undo"]


async def test_batches_asked_for_come_in_the_order_asked_without_the_missing(
    store: EventStore,
) -> None:
    # The dashboard lists the batches of a message in the order they first moved; SQLite
    # answers IN (...) in the order of its key.
    for name in ("a", "b", "c"):
        await store.append(f"batch-{name}", -1, new_batch(name, rows=1))

    found = await queries.get_batches(store, ["c", "missing", "a", "b"])

    assert [batch["batch_id"] for batch in found] == ["c", "a", "b"]
