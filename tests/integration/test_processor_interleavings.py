"""Interleavings of workers that HTTP cannot time: the directory is a script at the client's
seam (a warm-up that ends during a read, a create whose record lands after it); the store
is a real SQLite file."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from datetime import datetime, tzinfo
from typing import Any, Self

import pytest

from service.domain import batch as b
from service.domain import events as ev
from service.processing.directory_client import Answer, Outcome
from service.processing.pacing import Pauses
from service.processing.processor import Processor
from service.processing.upstream import UpstreamBatches
from service.settings import DirectorySettings
from service.store import event_store
from service.store.event_store import EventStore
from service.store.head_mark import Lost
from service.store.records import NewEvent

BATCH = "00000000-0000-4000-8000-000000000001"
A_AND_B = (ev.Row(1, "A", "1 Main St", None, 2), ev.Row(2, "B", "2 Main St", None, 3))


class ScriptedDirectory:
    """Row A's answer is lost; row B needs a warm-up that ends while A is being checked,
    and its first create, answer lost, is stored only after the check's read."""

    base_url = "http://directory.test"

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.creates_during_read: list[str] = []
        self._ids = itertools.count(1)
        self._idle = iter([0.0])  # A's prepare: awake; every later look: asleep
        self._reading = False
        self._read_over = asyncio.Event()
        self._warm_up_may_end = asyncio.Event()
        self._b_sent = asyncio.Event()

    def idle_for(self) -> float:
        return next(self._idle, float("inf"))

    async def warm_up(self) -> Answer:
        await self._warm_up_may_end.wait()
        return Answer(Outcome.OK, 200, {"status": "OK"}, "ok")

    def _store(self, name: str, address: str, phone: str | None, upstream: str) -> dict[str, Any]:
        record = {"id": next(self._ids), "name": name, "address": address, "phone": phone}
        self.records.append({**record, "creation_batch_id": upstream, "active": False})
        return record

    async def create(self, name: str, address: str, phone: str | None, upstream: str) -> Answer:
        if self._reading:
            self.creates_during_read.append(name)
        lost = Answer(Outcome.AMBIGUOUS, None, None, "ServerDisconnectedError")
        if name == "A":
            self._store(name, address, phone, upstream)
            return lost
        if not self._b_sent.is_set():  # stored once the read is over, answer lost
            self._b_sent.set()
            await self._read_over.wait()
            self._store(name, address, phone, upstream)
            return lost
        return Answer(Outcome.OK, 201, self._store(name, address, phone, upstream), "ok")

    async def batch_members(self, upstream: str) -> Answer:
        self._reading = True
        self._warm_up_may_end.set()
        with contextlib.suppress(TimeoutError):  # a create sent meanwhile would come now
            await asyncio.wait_for(self._b_sent.wait(), 0.3)
        listing = [dict(r) for r in self.records if r["creation_batch_id"] == upstream]
        self._reading = False
        self._read_over.set()
        return Answer(Outcome.OK, 200, listing, "ok")

    async def activate(self, upstream: str) -> Answer:
        for record in self.records:
            record["active"] = True
        return Answer(Outcome.OK, 200, {"activated_count": len(self.records)}, "ok")

    async def delete_batch(self, upstream: str) -> Answer:
        return Answer(Outcome.NOT_FOUND, 404, None, "HTTP 404")


async def started(store: EventStore, directory: ScriptedDirectory, **settings: Any) -> Processor:
    """A processor on `directory`, pacing off, started."""
    config = DirectorySettings(creates_per_minute=0, batch_calls_per_minute=0, **settings)
    processor = Processor(store, directory, config)  # type: ignore[arg-type]
    await processor.start()
    return processor


async def submit(store: EventStore, processor: Processor, rows: tuple[ev.Row, ...]) -> None:
    """Append BATCH with `rows` and hand it to the processor, as an upload does."""
    created = b.plan(BATCH, "batch.csv", rows, 20, "sha")
    stored = await store.append(b.stream_id(BATCH), -1, [NewEvent(created)])
    await processor.submit(stored[0])


async def run_to_end(processor: Processor) -> None:
    """Wait for BATCH to finish, then stop the processor."""
    try:
        await asyncio.wait_for(processor.wait_finished(BATCH), 10)
    finally:
        await processor.stop(grace=1.0)


async def fold_of(store: EventStore) -> b.BatchState:
    history = await store.read_stream(b.stream_id(BATCH))
    return b.fold((e.decode(), e.recorded_at) for e in history)


async def processed(
    store: EventStore, directory: ScriptedDirectory, rows: tuple[ev.Row, ...], **settings: Any
) -> b.BatchState:
    """BATCH of `rows` run to its end by a processor on `directory`; its fold."""
    processor = await started(store, directory, **settings)
    await submit(store, processor, rows)
    await run_to_end(processor)
    return await fold_of(store)


async def test_a_create_waits_for_the_check_of_its_upstream_batch_after_a_warm_up(
    store: EventStore,
) -> None:
    directory = ScriptedDirectory()
    state = await processed(
        store, directory, A_AND_B, concurrency=2, settle_seconds=0.0, backoff_base=0.05
    )

    assert directory.creates_during_read == []
    assert sorted(r["name"] for r in directory.records) == ["A", "B"]
    assert state.status == b.COMPLETED
    assert {row.hospital_id for row in state.rows.values()} == {r["id"] for r in directory.records}


class SleepyDirectory(ScriptedDirectory):
    """Asleep for good: each warm-up fails after a while; creates are answered."""

    def __init__(self) -> None:
        super().__init__()
        self.warm_ups = 0

    def idle_for(self) -> float:
        return float("inf")

    async def warm_up(self) -> Answer:
        self.warm_ups += 1
        await asyncio.sleep(0.2)
        return Answer(Outcome.AMBIGUOUS, None, None, "TimeoutError")

    async def create(self, name: str, address: str, phone: str | None, upstream: str) -> Answer:
        return Answer(Outcome.OK, 201, self._store(name, address, phone, upstream), "ok")


async def test_workers_waiting_for_a_warm_up_share_its_outcome_instead_of_repeating_it(
    store: EventStore,
) -> None:
    directory = SleepyDirectory()
    processor = await started(store, directory, concurrency=5)
    rows = tuple(ev.Row(n, f"H{n}", f"{n} Main St", None, n + 1) for n in range(1, 6))
    await submit(store, processor, rows)
    await run_to_end(processor)

    assert directory.warm_ups == 1  # five workers queued behind it; one 90 s wait, not five
    assert sorted(r["name"] for r in directory.records) == ["H1", "H2", "H3", "H4", "H5"]


class HeldDirectory(ScriptedDirectory):
    """Awake; a create waits for `answer` to be set. One cut off by its caller is stored all
    the same, as a directory that commits after the client gave up does."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.sent: list[str] = []
        self.cut_off: list[str] = []

    def idle_for(self) -> float:
        return 0.0

    async def create(self, name: str, address: str, phone: str | None, upstream: str) -> Answer:
        self.sent.append(name)
        try:
            await self.answer.wait()
        except asyncio.CancelledError:
            self.cut_off.append(name)
            self._store(name, address, phone, upstream)
            raise
        return Answer(Outcome.OK, 201, self._store(name, address, phone, upstream), "ok")

    async def batch_members(self, upstream: str) -> Answer:
        listing = [dict(r) for r in self.records if r["creation_batch_id"] == upstream]
        return Answer(Outcome.OK, 200, listing, "ok")


async def sent_one_row(store: EventStore, directory: HeldDirectory) -> Processor:
    """A processor whose one row's create is with the directory, unanswered."""
    processor = await started(store, directory, concurrency=1, settle_seconds=0.0)
    await submit(store, processor, (ev.Row(1, "H1", "1 Main St", None, 2),))
    async with asyncio.timeout(5):
        while not directory.sent:
            await asyncio.sleep(0.01)
    return processor


async def test_stop_records_a_create_answered_within_its_grace(store: EventStore) -> None:
    directory = HeldDirectory()
    processor = await sent_one_row(store, directory)

    stopping = asyncio.create_task(processor.stop(grace=5.0))
    await asyncio.sleep(0.05)  # stop() is waiting for the create
    assert not stopping.done()
    directory.answer.set()
    await asyncio.wait_for(stopping, 5)

    row = (await fold_of(store)).rows[1]
    assert (row.status, row.hospital_id, row.reconciled) == (b.ROW_CREATED, 1, False)
    assert directory.cut_off == [] and processor.workers_alive == 0


async def test_a_create_cut_off_by_stop_is_found_by_the_next_start_not_sent_again(
    store: EventStore,
) -> None:
    directory = HeldDirectory()
    processor = await sent_one_row(store, directory)

    await asyncio.wait_for(processor.stop(grace=0.2), 5)

    assert directory.cut_off == ["H1"] and processor.workers_alive == 0
    row = (await fold_of(store)).rows[1]
    assert (row.status, row.attempts, row.hospital_id) == (b.ROW_PENDING, 1, None)

    directory.answer.set()
    # A restart: the row's intent gets it checked.
    processor = await started(store, directory, concurrency=1, settle_seconds=0.0)
    await run_to_end(processor)

    state = await fold_of(store)
    assert directory.sent == ["H1"]  # found in the directory, never sent again
    assert len(directory.records) == 1
    assert state.status == b.COMPLETED
    assert (state.rows[1].hospital_id, state.rows[1].reconciled) == (1, True)


class RetriedAfterACheckDirectory(ScriptedDirectory):
    """Rows H1 and H2 (upstream batch one) lose their first answer and are not stored. The
    check's read of batch one is answered just after the last creates of batch two (H21,
    H22): their outcomes share the append that records H1 and H2 as to be sent again."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: collections.Counter[str] = collections.Counter()
        self._late = asyncio.Event()

    def idle_for(self) -> float:
        return 0.0

    async def create(self, name: str, address: str, phone: str | None, upstream: str) -> Answer:
        self.sent[name] += 1
        if name in ("H1", "H2") and self.sent[name] == 1:
            return Answer(Outcome.AMBIGUOUS, None, None, "ServerDisconnectedError")
        if name in ("H21", "H22"):
            await self._late.wait()
            await asyncio.sleep(0.005 if name == "H21" else 0.0)
        return Answer(Outcome.OK, 201, self._store(name, address, phone, upstream), "ok")

    async def batch_members(self, upstream: str) -> Answer:
        if not self._late.is_set():
            asyncio.get_running_loop().call_later(0.3, self._late.set)
            await self._late.wait()
            await asyncio.sleep(0.01)
        listing = [dict(r) for r in self.records if r["creation_batch_id"] == upstream]
        return Answer(Outcome.OK, 200, listing, "ok")


async def test_a_row_found_missing_by_a_check_is_sent_again_once(store: EventStore) -> None:
    append = store.append

    async def on_a_busy_disk(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.05)
        return await append(*args, **kwargs)

    store.append = on_a_busy_disk  # type: ignore[method-assign]
    directory = RetriedAfterACheckDirectory()
    rows = tuple(ev.Row(n, f"H{n}", f"{n} Main St", None, n + 1) for n in range(1, 23))
    # Upstream batches: rows 1-20 and 21-22.
    state = await processed(store, directory, rows, settle_seconds=0.05, backoff_base=0.04)

    assert directory.sent["H1"] == 2  # the lost one, then once more
    assert collections.Counter(r["name"] for r in directory.records)["H1"] == 1
    assert len(directory.records) == 22
    assert state.status == b.COMPLETED


class QueueingDirectory(ScriptedDirectory):
    """Row A's create waited in the directory's queue past its client's timeout (its answer
    is lost) and has just started when the check reads: the read, answered at once, misses
    it; A's record is stored right after, as a create stores 5 s after it starts."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: collections.Counter[str] = collections.Counter()
        self.reads = 0

    def idle_for(self) -> float:
        return 0.0

    async def create(self, name: str, address: str, phone: str | None, upstream: str) -> Answer:
        self.sent[name] += 1
        if self.sent[name] == 1:
            return Answer(Outcome.AMBIGUOUS, None, None, "TimeoutError")  # still queued
        return Answer(Outcome.OK, 201, self._store(name, address, phone, upstream), "ok")

    async def batch_members(self, upstream: str) -> Answer:
        self.reads += 1
        listing = [dict(r) for r in self.records if r["creation_batch_id"] == upstream]
        if self.reads == 1:
            asyncio.get_running_loop().call_later(
                0.02, self._store, "A", "1 Main St", None, upstream
            )
        return Answer(Outcome.OK, 200, listing, "ok")


async def test_a_row_missing_from_the_check_s_read_is_looked_for_again_not_sent_again(
    store: EventStore,
) -> None:
    directory = QueueingDirectory()
    state = await processed(store, directory, A_AND_B[:1], settle_seconds=0.1, backoff_base=0.04)

    assert directory.sent["A"] == 1  # sent again, it would be stored twice
    assert [r["name"] for r in directory.records] == ["A"]
    assert directory.reads == 3  # the check's two, then activation's
    assert state.status == b.COMPLETED and state.rows[1].hospital_id == directory.records[0]["id"]


class LostSecondReadDirectory(ScriptedDirectory):
    """Rows A and B lose their answers; only A is stored. The check's first read lists A,
    and every read after it fails."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def idle_for(self) -> float:
        return 0.0

    async def create(self, name: str, address: str, phone: str | None, upstream: str) -> Answer:
        if name == "A":
            self._store(name, address, phone, upstream)
        return Answer(Outcome.AMBIGUOUS, None, None, "TimeoutError")

    async def batch_members(self, upstream: str) -> Answer:
        self.reads += 1
        if self.reads > 1:
            return Answer(Outcome.AMBIGUOUS, 500, None, "HTTP 500")
        listing = [dict(r) for r in self.records if r["creation_batch_id"] == upstream]
        return Answer(Outcome.OK, 200, listing, "ok")


async def test_a_row_the_first_read_found_stays_found_when_the_second_read_fails(
    store: EventStore,
) -> None:
    directory = LostSecondReadDirectory()
    state = await processed(
        store, directory, A_AND_B, settle_seconds=0.05, backoff_base=0.01, max_attempts=2
    )

    assert directory.reads >= 3  # the check's first, then its second, tried twice
    assert (state.rows[1].hospital_id, state.rows[1].reconciled) == (1, True)
    assert (state.rows[2].status, state.rows[2].reason) == (b.ROW_FAILED, b.UNCONFIRMED)


class BrokenClient(ScriptedDirectory):
    """A client with a bug that strikes a worker before its first create."""

    def idle_for(self) -> float:
        raise ZeroDivisionError("a bug in the client")


async def test_a_worker_that_dies_says_why_in_the_log(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    processor = await started(store, BrokenClient(), concurrency=1)
    await submit(store, processor, A_AND_B[:1])
    async with asyncio.timeout(5):
        while processor.workers_alive:
            await asyncio.sleep(0.01)
    await processor.stop(grace=0.1)
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert [r.getMessage() for r in logged] == ["worker-0 stopped on an error"]
    assert isinstance(logged[0].exc_info[1], ZeroDivisionError)  # type: ignore[index]


async def test_background_work_that_fails_names_itself_and_its_batch(
    store: EventStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def a_bug(*args: Any) -> None:
        raise ZeroDivisionError("a bug in matching")

    monkeypatch.setattr(Processor, "_match", a_bug)  # row A's answer is lost: it is checked
    processor = await started(store, ScriptedDirectory(), concurrency=1, settle_seconds=0.0)
    await submit(store, processor, A_AND_B[:1])
    async with asyncio.timeout(5):
        while not any(r.levelno == logging.ERROR for r in caplog.records):
            await asyncio.sleep(0.01)
    await processor.stop(grace=0.1)

    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged[0].getMessage() == f"Processor._reconcile of batch {BATCH} failed"


class StoredWhileCheckedDirectory(ScriptedDirectory):
    """Two identical rows: the first create is lost unstored once the second is sent; the
    second is stored at once, and answered only after a read (or 0.5 s, if none comes)."""

    def __init__(self) -> None:
        super().__init__()
        self.creates = 0
        self._second_sent = asyncio.Event()
        self._read = asyncio.Event()

    def idle_for(self) -> float:
        return 0.0

    async def create(self, name: str, address: str, phone: str | None, upstream: str) -> Answer:
        self.creates += 1
        if self.creates == 1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._second_sent.wait(), 1.0)
            return Answer(Outcome.AMBIGUOUS, None, None, "ServerDisconnectedError")
        record = self._store(name, address, phone, upstream)
        if self.creates == 2:
            self._second_sent.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._read.wait(), 0.5)
        return Answer(Outcome.OK, 201, record, "ok")

    async def batch_members(self, upstream: str) -> Answer:
        self._read.set()
        listing = [dict(r) for r in self.records if r["creation_batch_id"] == upstream]
        return Answer(Outcome.OK, 200, listing, "ok")


async def test_a_check_without_settling_still_waits_for_the_creates_in_flight(
    store: EventStore,
) -> None:
    # settle_seconds 0 skips the settling pause: the check must still let the identical
    # row's create in flight end first, or it claims that row's record for the lost one.
    directory = StoredWhileCheckedDirectory()
    twins = (ev.Row(1, "A", "1 Main St", None, 2), ev.Row(2, "A", "1 Main St", None, 3))
    state = await processed(
        store, directory, twins, concurrency=2, settle_seconds=0.0, backoff_base=0.01
    )

    assert len(directory.records) == 2
    ids = sorted(row.hospital_id or 0 for row in state.rows.values())
    assert ids == sorted(r["id"] for r in directory.records)
    assert state.status == b.COMPLETED


class OnceFaultyClient(HeldDirectory):
    """Its first create raises (a bug in the client), after the directory stored the row."""

    async def create(self, name: str, address: str, phone: str | None, upstream: str) -> Answer:
        self.sent.append(name)
        record = self._store(name, address, phone, upstream)
        if len(self.sent) == 1:
            raise ZeroDivisionError("a bug in the client")
        return Answer(Outcome.OK, 201, record, "ok")


async def test_a_create_that_raises_has_its_row_checked_and_the_batch_finishes(
    store: EventStore,
) -> None:
    directory = OnceFaultyClient()
    state = await processed(store, directory, A_AND_B[:1], concurrency=1, settle_seconds=0.0)

    assert directory.sent == ["A"]  # found by the check, not sent again
    assert state.status == b.COMPLETED
    assert (state.rows[1].hospital_id, state.rows[1].reconciled) == (1, True)


async def test_rows_a_lost_log_reads_as_unsent_are_checked_under_a_new_attempt(
    store: EventStore,
) -> None:
    # Row A's first create never reached the directory; its second, in commits the log
    # lost, was stored. The check's outcome must not take the id of the first attempt's,
    # which the log holds: dropped as a repeat, it left the row to be checked forever.
    directory = HeldDirectory()
    directory._store("A", "1 Main St", None, BATCH)
    created = b.plan(BATCH, "batch.csv", A_AND_B[:1], 20, "sha")
    first = ev.HospitalRetryScheduled(1, 1, b.UNREACHABLE, "connection refused")
    await store.append(b.stream_id(BATCH), -1, [NewEvent(created)])
    await store.append(
        b.stream_id(BATCH),
        0,
        [
            NewEvent(ev.HospitalRequested((1,), (1,))),
            NewEvent(first, event_id=ev.derived_event_id(BATCH, 1, "outcome", 1)),
        ],
    )
    store.lost = Lost(store.head.position, store.head.position + 2)

    processor = await started(store, directory, concurrency=1, settle_seconds=0.0)
    await run_to_end(processor)

    state = await fold_of(store)
    assert directory.sent == []  # found, never sent again
    assert state.status == b.COMPLETED
    assert (state.rows[1].hospital_id, state.rows[1].attempts) == (1, 2)


class TwoChecksDirectory(ScriptedDirectory):
    """Every create is stored and its answer lost; the first two reads (one check per
    upstream batch) are answered together. An activation takes 50 ms, and one of a batch
    already active is refused with 400, as the directory does."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.patches: collections.Counter[str] = collections.Counter()
        self._both_read = asyncio.Event()

    def idle_for(self) -> float:
        return 0.0

    async def create(self, name: str, address: str, phone: str | None, upstream: str) -> Answer:
        self._store(name, address, phone, upstream)
        return Answer(Outcome.AMBIGUOUS, None, None, "TimeoutError")

    async def batch_members(self, upstream: str) -> Answer:
        self.reads += 1
        if self.reads == 2:
            self._both_read.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._both_read.wait(), 1.0)
        listing = [dict(r) for r in self.records if r["creation_batch_id"] == upstream]
        return Answer(Outcome.OK, 200, listing, "ok")

    async def activate(self, upstream: str) -> Answer:
        self.patches[upstream] += 1
        members = [r for r in self.records if r["creation_batch_id"] == upstream]
        if any(r["active"] for r in members):
            return Answer(Outcome.REJECTED, 400, {"detail": "already active"}, "HTTP 400")
        await asyncio.sleep(0.05)
        for record in members:
            record["active"] = True
        return Answer(Outcome.OK, 200, {"activated_count": len(members)}, "ok")


async def test_checks_that_end_together_activate_the_batch_once(store: EventStore) -> None:
    # Both upstream batches' checks find their row, and end one after the other: the first
    # end starts the activation, the second must not start another beside it.
    directory = TwoChecksDirectory()
    processor = await started(store, directory, concurrency=2, settle_seconds=0.0)
    created = b.plan(BATCH, "batch.csv", A_AND_B, 1, "sha")  # one row per upstream batch
    stored = await store.append(b.stream_id(BATCH), -1, [NewEvent(created)])
    await processor.submit(stored[0])
    await run_to_end(processor)

    state = await fold_of(store)
    assert state.status == b.COMPLETED
    assert all(row.reconciled for row in state.rows.values())
    assert sorted(directory.patches.values()) == [1, 1]  # one PATCH per upstream batch


class DownDirectory(ScriptedDirectory):
    """Refuses every connection: nothing it is sent reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def batch_members(self, upstream: str) -> Answer:
        self.reads += 1
        return Answer(Outcome.NOT_SENT, None, None, "cannot connect: refused")


async def test_reads_that_never_reach_the_directory_take_no_place_in_its_window() -> None:
    # Two reads a window: had the refused connections counted, the third try of the read
    # would wait the whole window for a place the directory never saw used.
    directory = DownDirectory()
    settings = DirectorySettings(
        batch_calls_per_minute=2, rate_window_seconds=60.0, backoff_base=0.0, backoff_max=0.0
    )
    calls = UpstreamBatches(directory, settings, Pauses())  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        answer = await calls.members("one")

    assert (answer.outcome, directory.reads) == (Outcome.NOT_SENT, settings.max_attempts)


class RefusingOnceDirectory(ScriptedDirectory):
    """Its first read is refused with 429 (another caller used the window); it notes when
    each read comes."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, float]] = []

    async def batch_members(self, upstream: str) -> Answer:
        self.reads.append((upstream, time.monotonic()))
        if len(self.reads) == 1:
            return Answer(Outcome.RATE_LIMITED, 429, None, "HTTP 429")
        return Answer(Outcome.OK, 200, [], "ok")


async def test_a_429_on_one_upstream_batch_holds_back_the_reads_of_the_others() -> None:
    # The directory tells no one how long its window lasts: after a 429, a read of another
    # upstream batch sent before the window passed would be refused as well.
    directory = RefusingOnceDirectory()
    settings = DirectorySettings(
        batch_calls_per_minute=0, rate_window_seconds=0.3, rate_window_margin=0.0
    )
    calls = UpstreamBatches(directory, settings, Pauses())  # type: ignore[arg-type]
    first = asyncio.create_task(calls.members("one"))
    async with asyncio.timeout(5):
        while not directory.reads:
            await asyncio.sleep(0.01)
    await calls.members("two")
    await first

    (_, refused_at), (upstream, then) = directory.reads[0], directory.reads[1]
    assert upstream == "two"
    assert then - refused_at >= 0.3


class NinetySecondsAgo(datetime):
    """The event store's wall clock, 90 s behind the real one."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> Self:
        return cls.fromtimestamp(time.time() - 90.0, tz)


async def test_a_restart_counts_creates_got_ready_a_window_before_as_sent_now(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 30 rows got ready 90 s before a crash, waited for the window (up to a whole one), and
    # their creates, unanswered, may have gone out just before it: the directory's window
    # may be full, so the next row waits a window, or it would be refused with 429.
    rows = tuple(ev.Row(n, f"H{n}", f"{n} Main St", None, n + 1) for n in range(1, 32))
    created = b.plan(BATCH, "batch.csv", rows, 20, "sha")
    monkeypatch.setattr(event_store, "datetime", NinetySecondsAgo)
    await store.append(b.stream_id(BATCH), -1, [NewEvent(created)])
    await store.append(
        b.stream_id(BATCH), 0, [NewEvent(ev.HospitalRequested(tuple(range(1, 31)), (1,) * 30))]
    )
    monkeypatch.setattr(event_store, "datetime", datetime)
    config = DirectorySettings(creates_per_minute=30, batch_calls_per_minute=0)
    processor = Processor(store, HeldDirectory(), config)  # type: ignore[arg-type]
    await processor.start()
    try:
        held = processor.held_by_window(BATCH)
    finally:
        await processor.stop(grace=0.1)

    assert held > 55.0
