"""The worker pool: rows of every batch become directory calls, every outcome an event."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from asyncio import FIRST_COMPLETED
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from service.domain import batch as b
from service.domain import events as ev
from service.domain.matching import HospitalRecord, pair
from service.processing.directory_client import Answer, DirectoryClient, Outcome
from service.processing.outbox import Outbox
from service.processing.pacing import Lookahead, Pauses, WindowPacer, backoff
from service.processing.runs import BatchRun, Gate
from service.processing.sent_lately import sent_lately
from service.processing.upstream import UpstreamBatches
from service.processing.warmup import WarmUp
from service.projections import queries
from service.settings import DirectorySettings
from service.store.event_store import EventStore
from service.store.head_mark import Lost
from service.store.records import ConcurrencyError, NewEvent, StoredEvent
from service.tasks import log_failure

log = logging.getLogger(__name__)

MOST_AHEAD = 12  # rows a worker gets ready ahead at most (docs/performance.md)
AHEAD_WAIT = 0.05  # seconds a later batch may wait behind the rows got ready ahead
WANTED_CHECK = 0.5  # seconds between looks at a row waiting for the window: still wanted?
STOP_REASON = "the service is stopping"  # why a row got ready is withdrawn at a stop
WRONG_ADDRESS = "is directory.base_url (EXTERNAL_API_BASE_URL) the directory's address?"


class Refused(Exception):
    """A lifecycle request that the batch's state does not allow (409 at the API)."""


class Withdrawn(Exception):
    """A ready row's create must not be sent any more."""


@dataclass(frozen=True)
class Ready:
    """A row whose intent is in the log, waiting for its create to be sent."""

    run: BatchRun
    row: int
    gate: Gate
    attempt: int

    @property
    def batch_id(self) -> str:
        return self.run.batch_id


def _still_to_check(run: BatchRun, rows: list[int]) -> list[int]:
    """The rows still waiting for a check: pending, their create maybe stored."""
    state = run.state.rows
    return [n for n in rows if state[n].status == b.ROW_PENDING and state[n].may_exist]


def _outcome_id(row: int, attempt: int) -> tuple[object, ...]:
    """The id parts of the one outcome an attempt of a row may have."""
    return (row, "outcome", attempt)


async def _collect_ready(
    getting: set[asyncio.Task[Ready | None]], into: deque[Ready]
) -> set[asyncio.Task[Ready | None]]:
    """Wait for the first of `getting` to end; put the rows got ready `into` (a task ends
    with None once the pool stops) and return the tasks still under way."""
    done, pending = await asyncio.wait(getting, return_when=FIRST_COMPLETED)
    into.extend(ready for task in done if (ready := task.result()) is not None)
    return pending


class Processor:
    """Runs every unfinished batch to its end: creates, reconciliation, activation, rollback."""

    def __init__(
        self,
        store: EventStore,
        client: DirectoryClient,
        settings: DirectorySettings,
        on_status: Callable[[b.BatchState], object] | None = None,
    ) -> None:
        """`on_status(state)` is called when a batch being worked on changes status, is
        rolled back, or has a rollback refused (either may leave its status as it was)."""
        self._store, self._client, self._settings = store, client, settings
        self._pauses = Pauses()
        self._upstream = UpstreamBatches(client, settings, self._pauses)
        self._on_status = on_status
        self._pacer = WindowPacer(
            settings.creates_per_minute, settings.rate_window_seconds, settings.rate_window_margin
        )
        # With pacing on, creates wait for the window, not for commits: one row ahead.
        most = 1 if settings.creates_per_minute else MOST_AHEAD
        self._lookahead = Lookahead(most, AHEAD_WAIT)
        self._runs: dict[str, BatchRun] = {}
        self._registered = asyncio.Event()  # set, and replaced, as each run is registered
        self._line: deque[BatchRun] = deque()  # batches with queued rows, served round robin
        self._work = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warm_up = WarmUp(client, settings)
        # One lifecycle decision at a time: each is a read, a check and an append, and two
        # interleaved (two resumes) would both pass their checks on the same state.
        self._deciding = asyncio.Lock()
        self._stopping = False
        self._halted_at = 0.0  # time.monotonic() when the stop began
        # Rows whose intent is in the log that no worker has taken to send yet: one may sit
        # behind a create that a stop cuts off, so the halt withdraws them itself.
        self._got_ready: set[Ready] = set()

    # Lifecycle of the pool ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers, then pick up every batch the log says is unfinished."""
        if self._settings.creates_per_minute:
            # Two windows back: where the window open now began depends on the one before it.
            lately = 2 * (self._settings.rate_window_seconds + self._settings.rate_window_margin)
            self._pacer.replay(await sent_lately(self._store, lately))
        self._workers = [
            asyncio.create_task(self._worker(), name=f"worker-{i}")
            for i in range(self._settings.concurrency)
        ]
        for worker in self._workers:
            worker.add_done_callback(log_failure)
        if (lost := self._store.lost) is not None:
            log.warning(
                "the log ends at position %d, but was committed up to %d: it is an older copy, "
                "or lost its last commits; the rows of unfinished batches it reads as unsent "
                "are looked for in the directory before any create",
                *lost,
            )
        for batch_id in await queries.unfinished_batch_ids(self._store):
            run = await self._load(batch_id)
            if run is None:
                continue
            if lost is not None:
                await self._record_loss(run, lost)
            self._register(run)
            self._schedule(run)
            state, c = run.state, run.state.counts()
            log.info(
                "recovering batch %s: %d created, %d failed of %d rows; %d to send, "
                "%d to check with the directory",
                batch_id,
                c.created,
                c.failed,
                c.total,
                len(state.to_create()),
                len(state.to_reconcile()),
            )
        if lost is not None:
            await self._store.loss_recorded()

    async def _record_loss(self, run: BatchRun, lost: Lost) -> None:
        """Record that the rows to send may have been sent by commits the log lost: from
        then on they are looked for before being sent, after any later restart too."""
        if unsent := run.state.to_create():
            rows, attempts = tuple(r.row.row for r in unsent), tuple(r.attempts + 1 for r in unsent)
            fact = ev.LogLossDetected(rows, attempts, *lost)
            # A later loss of a log that holds this fact ends past it: its id is its own.
            await self._emit(run, fact, "log-loss", lost.log_position)

    async def stop(self, grace: float) -> None:
        """Halt (if not yet), give calls in flight `grace` seconds from the halt, then cancel
        the rest.

        Whatever is cut off is safe: its intent is in the log, and the next start
        reconciles it with the directory before sending anything again.
        """
        self.halt(grace)
        # Work spawned during the grace (the record of an answer that came in it) gets the
        # rest of the grace, then is cancelled like the rest, not left behind.
        deadline = self._halted_at + grace
        while (left := self._unfinished()) and (rest := deadline - time.monotonic()) > 0:
            await asyncio.wait(left, timeout=rest)
        if left := self._unfinished():
            creating = (
                f"{n} of batch {run.batch_id}"
                for run in self._runs.values()
                if (n := sum(gate.in_flight for gate in run.gates.values()))
            )
            log.warning(
                "stopping: %d task(s) still under way after %.1f s are cut off (creates in "
                "flight: %s); the next start takes their work up from the log, and looks "
                "for a create cut off in the directory before it sends it again",
                len(left),
                grace,
                ", ".join(creating) or "none",
            )
        while left := self._unfinished():
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

    def halt(self, grace: float) -> None:
        """Start nothing new with the directory from now on: the service begins to stop.

        Called as soon as a stop begins, before the HTTP server waits for the requests under
        way (up to the same timeout); `stop` then gives the calls in flight what is left of
        `grace` from here.
        """
        if self._stopping:
            return
        self._stopping, self._halted_at = True, time.monotonic()
        self._work.set()
        self._pauses.stop()
        for ready in self._got_ready:  # never sent: recorded now, not looked for at next start
            self._spawn(self._withdraw(ready, STOP_REASON), ready.run)
        self._got_ready.clear()
        log.info("stopping: no new row is sent; calls in flight get up to %.1f s", grace)

    def _status_changed(self, state: b.BatchState) -> None:
        """Tell the operator where a batch went, then whoever else wants to know."""
        c = state.counts()
        said = f"{c.created} created, {c.failed} failed, {c.deleted} deleted of {c.total} rows"
        why = state.activation_failure
        if state.rollback_failure is not None:  # the latest, and the one an operator acts on
            why = (
                f"{state.rollback_failure}; nothing more is tried until "
                f"DELETE /batch/{state.batch_id} is sent again"
            )
        elif why is None and c.failed:
            errors = (f"row {r.row.row}: {r.error}" for r in state.rows.values() if r.error)
            why = next(errors, None)
        status: str = state.status
        if state.rolled_back:  # done as asked: it reads `failed` at the API, but is no failure
            status, why = "rolled back", None
        finished_well = state.status == b.COMPLETED or state.rolled_back
        finished_well &= state.rollback_failure is None  # a completed batch's, too
        level = logging.INFO if finished_well or state.status not in b.FINISHED else logging.WARNING
        log.log(
            level,
            "batch %s %s: %s%s",
            state.batch_id,
            status,
            said,
            f"; {why}" if why else "",
        )
        if self._on_status is not None:
            self._on_status(state)

    def _unfinished(self) -> list[asyncio.Task[Any]]:
        return [t for t in (*self._workers, *self._tasks) if not t.done()]

    @property
    def workers_alive(self) -> int:
        """Worker tasks still running (a worker that stopped on an error is not replaced)."""
        return sum(not t.done() for t in self._workers)

    def live_state(self, batch_id: str) -> b.BatchState | None:
        """The fold of a batch being worked on, as its last committed event left it."""
        run = self._runs.get(batch_id)
        return run.state if run is not None else None

    def held_by_window(self, batch_id: str) -> float:
        """Seconds the rate window still holds back a batch's next creates (0: not held)."""
        wait = self._pacer.seconds_to_room()
        run = self._runs.get(batch_id)
        if wait <= 0 or run is None or run.state.rollback_requested:
            return 0.0
        return wait if run.state.to_create() or run.at_window else 0.0

    @property
    def active_batches(self) -> int:
        """Batches with work queued, in flight, or under way."""
        return sum(not run.idle for run in self._runs.values())

    # Entry points ---------------------------------------------------------------------------

    async def submit(self, created: StoredEvent) -> None:
        """Start work on a batch whose BatchCreated was just committed."""
        event = created.decode()
        assert isinstance(event, ev.BatchCreated)
        log.info(
            "batch %s accepted: %d rows of %r", event.batch_id, len(event.rows), event.file_name
        )
        async with self._deciding:
            # A rollback may have come between the commit and now, folding the batch from
            # the log: a run of this event alone would send the rows it withdrew.
            if event.batch_id in self._runs:
                return
            run = BatchRun(b.start(event, created.recorded_at), on_status=self._status_changed)
            try:
                if await self._store.stream_version(created.stream_id) > created.stream_version:
                    run = await self._load(event.batch_id) or run
            finally:  # the batch is in the log: taken up even if that read fails
                self._register(run)
                self._schedule(run)

    async def wait_finished(self, batch_id: str) -> None:
        """Return once the batch has nothing left to do (bound it with asyncio.timeout).

        A batch is taken up only once the append that gives it work (its upload, a resume,
        a rollback) has committed: a request that reads it in between (a bulk upload with
        the same Idempotency-Key) waits for that, rather than take the batch for finished.
        """
        while (run := self._runs.get(batch_id)) is None:
            registered = self._registered
            if not await queries.is_unfinished(self._store, batch_id):
                return
            await registered.wait()
        await run.finished.wait()

    async def resume(self, batch_id: str, actor: dict[str, Any]) -> b.BatchState:
        """Send the failed rows back to work, checking the directory for each one first."""
        async with self._deciding:
            run = await self._current(batch_id)
            state = run.state
            if state.rollback_failure is not None:
                raise Refused(
                    f"batch {batch_id} is being rolled back, and its last try failed: "
                    "roll it back again (DELETE) once the directory allows it"
                )
            if state.rolled_back or state.rollback_requested:
                # Before the check of work under way: a rollback still running is work under
                # way too, but resuming once it ends is refused, so that is not the advice.
                done = "was rolled back" if state.rolled_back else "is being rolled back"
                again = "upload the file again instead"
                if state.idempotency_key is not None:  # that key gives this batch back
                    again = "upload the file again with a new Idempotency-Key instead"
                raise Refused(f"batch {batch_id} {done}; {again}")
            if not run.idle or state.status in (b.PENDING, b.PROCESSING):
                raise Refused(
                    f"batch {batch_id} is still processing; resume it once it has finished"
                )
            failed = tuple(r.row.row for r in state.rows.values() if r.status == b.ROW_FAILED)
            if not failed and state.activation_failure is None:
                raise Refused(f"batch {batch_id} has nothing to resume: no failed row")
            await self._decide(run, ev.BatchResumed(failed), actor)
            if failed:
                log.info("batch %s resumed: %d failed rows to try again", batch_id, len(failed))
            else:
                log.info("batch %s resumed: its activation is tried again", batch_id)
            self._schedule(run)
        return run.state

    async def rollback(self, batch_id: str, actor: dict[str, Any]) -> b.BatchState:
        """Stop new creates, let those in flight end, then delete the batch's hospitals."""
        async with self._deciding:
            run = await self._current(batch_id)
            if not run.state.rollback_requested or run.state.rollback_failure is not None:
                # No state forbids a rollback, so it does not wait for a quiet stream: outcomes
                # that workers record meanwhile must not turn it into a conflict. After a
                # failed rollback, asking again is what tries again.
                await self._decide(run, ev.BatchRollbackRequested(), actor, check_version=False)
                log.info("batch %s: rollback asked for", batch_id)
                run.queue.clear()
            if run.idle:
                # Otherwise the last create, check or activation under way schedules the deletes.
                self._schedule(run)
        return run.state

    async def _current(self, batch_id: str) -> BatchRun:
        """The batch as it is being worked on, or else as the log folds it (not yet registered)."""
        run = self._runs.get(batch_id) or await self._load(batch_id)
        if run is None:
            raise KeyError(batch_id)
        return run

    async def _decide(
        self, run: BatchRun, event: ev.Event, actor: dict[str, Any], check_version: bool = True
    ) -> None:
        """Append a user's decision, by default only if nothing happened since it was read."""
        expected = run.state.version if check_version else None
        try:
            stored = await self._store.append(
                b.stream_id(run.batch_id), expected, [NewEvent(event, metadata=actor)]
            )
        except ConcurrencyError as exc:
            raise Refused(f"batch {run.batch_id} changed meanwhile; try again") from exc
        run.absorb(stored)
        run.finished.clear()
        # Registered only now: a refused request leaves no run behind that would never finish.
        self._register(run)

    def _register(self, run: BatchRun) -> None:
        """Let the processor know the batch (a newer run of it replaces the older)."""
        self._runs[run.batch_id] = run
        self._registered.set()
        self._registered = asyncio.Event()

    # Scheduling ---------------------------------------------------------------------------

    async def _load(self, batch_id: str) -> BatchRun | None:
        """The batch as the log folds it, not registered."""
        history = await self._store.read_stream(b.stream_id(batch_id))
        if not history:
            return None
        return BatchRun(
            b.fold((e.decode(), e.recorded_at) for e in history), on_status=self._status_changed
        )

    def _schedule(self, run: BatchRun) -> None:
        """Give a batch whatever work its fold calls for next."""
        state = run.state
        queued = set(run.queue) | run.held  # rows a worker or a retry timer already has
        for row in state.to_reconcile():
            gate = run.gate(row.creation_batch_id)
            if row.row.row not in gate.suspects and row.row.row not in queued:
                gate.suspect(row.row.row)
                self._reconcile_soon(run, gate)
        self._enqueue(run, [r.row.row for r in state.to_create() if r.row.row not in queued])
        if run.task is None and (state.needs_rollback() and self._quiet(run)):
            run.task = self._spawn(self._roll_back(run), run)
        elif run.task is None and state.ready_to_activate():
            run.task = self._spawn(self._activate(run), run)
        if run.idle and not state.unsettled():
            run.finished.set()
            if self._runs.get(run.batch_id) is run:  # not a newer run of the same batch
                del self._runs[run.batch_id]

    def _schedule_unless_stopping(self, run: BatchRun) -> None:
        if not self._stopping:
            self._schedule(run)

    @staticmethod
    def _quiet(run: BatchRun) -> bool:
        return not run.held and not any(g.busy for g in run.gates.values())

    def _enqueue(self, run: BatchRun, rows: list[int]) -> None:
        if not rows:
            return
        run.queue.extend(rows)
        if not run.scheduled:
            run.scheduled = True
            self._line.append(run)
        self._work.set()

    def _requeue(self, run: BatchRun, rows: list[int]) -> None:
        """Queue held rows again; once the pool stops, the next start picks them up."""
        run.held.difference_update(rows)
        if not self._stopping:
            self._enqueue(run, rows)

    def _spawn(
        self, work: Coroutine[Any, Any, None], run: BatchRun | None = None
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=getattr(work, "__qualname__", None))
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            failed = not t.cancelled() and t.exception() is not None
            if failed:
                of = f" of batch {run.batch_id}" if run is not None else ""
                log.error("%s%s failed", t.get_name(), of, exc_info=t.exception())
            if run is None:
                return
            if run.task is t:
                run.task = None
            if failed:  # the same fault would strike again at once: look again after a pause
                pause = self._settings.backoff_max
                asyncio.get_running_loop().call_later(pause, self._schedule_unless_stopping, run)
            else:
                self._schedule_unless_stopping(run)

        task.add_done_callback(done)
        return task

    async def _next_row(self, wait: bool = True) -> tuple[BatchRun, int] | None:
        """The next queued row, round robin over the batches; None once the pool stops, or
        without `wait` when no row is queued."""
        while not self._stopping:
            while self._line:
                run = self._line.popleft()
                if run.queue:
                    row = run.queue.popleft()
                    run.held.add(row)
                    if run.queue:
                        self._line.append(run)
                    else:
                        run.scheduled = False
                    return run, row
                run.scheduled = False
            if not wait:
                return None
            self._work.clear()
            await self._work.wait()
        return None

    async def _worker(self) -> None:
        """Send one row at a time while the next ones get ready (Lookahead says how many).

        A row is ready once its intent is committed, so that commit overlaps the creates
        before it instead of holding up the directory's pipe. Rows are sent in the order
        they get ready (a row of an upstream batch being checked is set aside, not waited
        for). Once the pool stops, the rows already got ready are withdrawn rather than sent.
        """
        getting: set[asyncio.Task[Ready | None]] = set()
        ready_rows: deque[Ready] = deque()
        try:
            while ready_rows or getting or not self._stopping:
                if not ready_rows:
                    if not getting:  # idle: one row waited for, so a new batch is spread
                        getting.add(asyncio.create_task(self._next_ready()))
                    getting = await _collect_ready(getting, ready_rows)
                    continue
                ready = ready_rows.popleft()
                if ready not in self._got_ready:  # withdrawn by the halt
                    continue
                self._got_ready.discard(ready)
                while not self._stopping and (
                    len(getting) + len(ready_rows) < self._lookahead.depth()
                ):
                    # Rows ahead are only taken while some are queued: one that waited for
                    # the next batch would line its rows up here while other workers had none.
                    getting.add(asyncio.create_task(self._next_ready(wait=False)))
                await self._send(ready)
                del ready  # an idle worker must not keep its last batch's fold alive
        finally:
            for task in getting:
                task.cancel()

    async def _send(self, ready: Ready) -> None:
        try:
            answer = await self._deliver(ready)
        except Withdrawn as why:
            await self._withdraw(ready, str(why))
            return
        except Exception:  # it may have been sent: the row's intent gets it checked
            log.exception("creating row %s of batch %s failed", ready.row, ready.batch_id)
            await self._settle(ready)
            return
        except BaseException:  # the pool stopping: the next start checks the row
            ready.gate.in_flight -= 1
            raise
        # The worker moves on; the row stays held (and its create counted in flight) until
        # its outcome is in the log.
        self._spawn(self._record(ready, answer))

    async def _next_ready(self, wait: bool = True) -> Ready | None:
        """The next row with its intent in the log, or None once the pool stops (or, without
        `wait`, once no row is queued).

        A row is only taken while the window has room, as an intent that waits for the next
        window holds a check of its upstream batch back and, after a crash, costs the row
        one of its attempts. The room is seen, not reserved: when more workers look than
        slots are left, the last rows taken wait in `_deliver` for the next window.
        """
        while True:
            await self._room()
            if (job := await self._next_row(wait)) is None:
                return None
            run, row = job
            await self._warm_up.ensure_awake()
            gate = run.gate(run.state.rows[row].creation_batch_id)
            if gate.reconciling is not None:  # set aside, still held: the check's end queues it
                gate.parked.append(row)
                continue
            try:
                ready = await self._prepare(run, row, gate)
            except Exception:  # its intent is not in the log: held, the row comes back later
                log.exception("preparing row %s of batch %s failed", row, run.batch_id)
                # The same fault (a log that cannot commit) would strike again at once.
                pause = self._settings.backoff_max
                asyncio.get_running_loop().call_later(pause, self._requeue, run, [row])
                continue
            if ready is not None:
                if self._stopping:  # got ready as the pool stopped: never to be sent
                    self._spawn(self._withdraw(ready, STOP_REASON), run)
                    return None
                self._got_ready.add(ready)
                return ready
            self._release(run, row)

    async def _room(self, ready: Ready | None = None) -> None:
        """Wait until the window has room, or the wait is moot: the pool stops, or `ready`'s
        batch is rolled back. A window lasts up to a minute, so that is looked at every
        WANTED_CHECK seconds."""
        while not (
            self._stopping
            or (ready is not None and ready.run.state.rollback_requested)
            or self._pacer.has_room()  # pacing off, or room now: no timer on the hot path
        ):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WANTED_CHECK):
                    await self._pacer.room()

    def _release(self, run: BatchRun, row: int) -> None:
        run.held.discard(row)
        # Rows left to send keep the batch going; only its last row decides what is next.
        if not self._stopping and not run.queue and not run.held:
            self._schedule(run)

    # Creating -----------------------------------------------------------------------------

    async def _emit(
        self, run: BatchRun, event: ev.Event, *id_parts: object, cause: str = "processing"
    ) -> None:
        """Append a worker's fact; its id derives from the decision, so a retry stores it once."""
        fact = self._fact(run.state, event, *id_parts, cause=cause)
        run.absorb(await self._outbox(run).emit(fact))

    @staticmethod
    def _fact(
        state: b.BatchState, event: ev.Event, *id_parts: object, cause: str = "processing"
    ) -> NewEvent:
        if state.resumes:
            # After a resume, the same row and attempt is a new decision: without this, the
            # resumed row's outcome would take the id of the failure it replaces, and be dropped.
            id_parts = (*id_parts, "resume", state.resumes)
        return NewEvent(
            event,
            event_id=ev.derived_event_id(state.batch_id, *id_parts),
            metadata={"actor": "processor", "cause": cause},
        )

    def _outbox(self, run: BatchRun) -> Outbox:
        if run.outbox is None:
            state = run.state  # not the run: the run holds its outbox, and would never go

            def intent(rows: tuple[int, ...], attempts: tuple[int, ...]) -> NewEvent:
                pairs = (f"{n}.{a}" for n, a in zip(rows, attempts, strict=True))
                return self._fact(state, ev.HospitalRequested(rows, attempts), "requested", *pairs)

            append = functools.partial(self._store.append, b.stream_id(run.batch_id), None)
            run.outbox = Outbox(append, intent, self._spawn)
        return run.outbox

    async def _prepare(self, run: BatchRun, n: int, gate: Gate) -> Ready | None:
        """Record the intent to send row `n`, whose `gate` was just found open; None when the
        row needs no create now.

        The row counts in flight before the first await: a reconciliation that starts
        later waits for this create to end before it reads the directory.
        """
        row = run.state.rows[n]
        if row.status != b.ROW_PENDING or row.may_exist or run.state.rollback_requested:
            return None
        attempt = row.attempts + 1
        gate.in_flight += 1
        try:
            run.absorb(await self._outbox(run).request(n, attempt))
        except BaseException:
            gate.in_flight -= 1
            await gate.notify()
            raise
        return Ready(run, n, gate, attempt)

    async def _deliver(self, ready: Ready) -> Answer:
        """Send a ready row's create within the window's limit, unless it was withdrawn.

        The row is held, so nothing else changed it since its intent; only a rollback or
        the pool stopping can have come in between, or while the window was full.
        """
        ready.run.at_window += 1
        try:
            await self._room(ready)
        finally:
            ready.run.at_window -= 1
        self._check_wanted(ready)
        counted_at = await self._pacer.acquire()  # room seen in this same step: no wait
        row = ready.run.state.rows[ready.row].row
        started = time.monotonic()
        answer = await self._client.create(
            row.name, row.address, row.phone, ready.gate.creation_batch_id
        )
        if answer.outcome is Outcome.NOT_SENT:  # the directory saw nothing to count
            self._pacer.unused(counted_at)
        else:
            self._lookahead.created(time.monotonic() - started)
        return answer

    def _check_wanted(self, ready: Ready) -> None:
        if ready.run.state.rollback_requested:
            raise Withdrawn("the batch is being rolled back")
        if self._stopping:
            raise Withdrawn(STOP_REASON)

    async def _withdraw(self, ready: Ready, why: str) -> None:
        """Record that a ready row was not sent after all, so it needs no check before
        being sent again (and the attempt does not count as a failure)."""
        try:
            fact = ev.HospitalRetryScheduled(
                ready.row, ready.attempt, b.WITHDRAWN, f"not sent: {why}"
            )
            await self._emit(ready.run, fact, *_outcome_id(ready.row, ready.attempt))
        except Exception:  # the intent stands, and gets the row checked
            log.exception(
                "recording that row %s of batch %s was not sent", ready.row, ready.batch_id
            )
        await self._settle(ready)

    async def _settle(self, ready: Ready, held: bool = False) -> None:
        """The row's create is over (or never left): count it out and, unless a retry timer
        holds the row, let the batch go on."""
        ready.gate.in_flight -= 1
        await ready.gate.notify()
        if not held:
            self._release(ready.run, ready.row)

    async def _record(self, ready: Ready, answer: Answer) -> None:
        """Record a create's answer, then settle its row (still held if a retry timer has it)."""
        held = False
        try:
            held = await self._record_create(ready, answer)
        finally:
            await self._settle(ready, held=held)

    async def _record_create(self, ready: Ready, answer: Answer) -> bool:
        """Append what the answer proves; True when the row waits for a retry timer."""
        run, gate, n, attempt = ready.run, ready.gate, ready.row, ready.attempt
        outcome_id = _outcome_id(n, attempt)
        hospital_id = answer.body.get("id") if isinstance(answer.body, dict) else None
        if answer.ok and isinstance(hospital_id, int):
            created_at = answer.body.get("created_at")
            created_at = created_at if isinstance(created_at, str) else None
            await self._emit(
                run, ev.HospitalCreated(n, hospital_id, created_at=created_at), *outcome_id
            )
        elif answer.outcome in (Outcome.REJECTED, Outcome.NOT_FOUND):
            message = f"the directory refused the row (HTTP {answer.status}): {answer.message}"
            if answer.status in (404, 405):  # never the directory's answer to a create
                message += f"; {WRONG_ADDRESS}"
            await self._emit(
                run, ev.HospitalFailed(n, b.REJECTED, message, retryable=False), *outcome_id
            )
        elif answer.outcome is Outcome.RATE_LIMITED:
            if self._pacer.refused():
                log.warning(
                    "the directory refused a create with 429 (%s): creates pause %.0f s",
                    answer.message,
                    self._settings.rate_window_seconds + self._settings.rate_window_margin,
                )
            retry = ev.HospitalRetryScheduled(n, attempt, b.RATE_LIMITED, answer.message)
            await self._emit(run, retry, *outcome_id)
            self._enqueue(run, [n])
        elif answer.outcome is Outcome.NOT_SENT:
            return await self._retry_later(run, n, attempt, b.UNREACHABLE, answer.message)
        else:  # AMBIGUOUS, or a 2xx without an id: it may be stored; look before re-sending
            said = answer.message
            if answer.status is not None and not said.startswith(f"HTTP {answer.status}"):
                said = f"HTTP {answer.status}: {said}"
            gate.suspect(n, said)
            self._reconcile_soon(run, gate)
        return False

    async def _retry_later(
        self, run: BatchRun, n: int, attempt: int, reason: str, message: str
    ) -> bool:
        """Record a failed attempt and hold the row for a retry after a backoff (True), or,
        once it has failed max_attempts times, record the row as failed (False)."""
        if (failures := run.state.rows[n].failures + 1) >= self._settings.max_attempts:
            said = f"gave up after {failures} failed attempts: {message}"
            failed = ev.HospitalFailed(n, reason, said, retryable=True)
            await self._emit(run, failed, *_outcome_id(n, attempt))
            return False
        # Held before the fact commits: from then on the fold says the row is to be sent, and
        # anything that schedules the batch meanwhile would queue it beside the retry timer.
        held_before = n in run.held
        run.held.add(n)
        try:
            retry = ev.HospitalRetryScheduled(n, attempt, reason, message)
            await self._emit(run, retry, *_outcome_id(n, attempt))
        except BaseException:
            if not held_before:
                run.held.discard(n)
            raise
        delay = backoff(
            run.state.rows[n].failures, self._settings.backoff_base, self._settings.backoff_max
        )
        asyncio.get_running_loop().call_later(delay, self._requeue, run, [n])
        return True

    # Reconciling --------------------------------------------------------------------------

    def _reconcile_soon(self, run: BatchRun, gate: Gate) -> None:
        if gate.reconciling is None:
            gate.reconciling = self._spawn(self._reconcile(run, gate), run)

    async def _reconcile(self, run: BatchRun, gate: Gate) -> None:
        """Match rows whose create may have been stored against the directory's records."""
        suspects: list[int] = []
        try:
            # A create whose answer was lost can still be stored seconds later: let it settle,
            # and let every create in flight for this upstream batch end first.
            while (wait := gate.settle_left(self._settings.settle_seconds)) > 0:
                await self._pauses.sleep(wait)
                await gate.wait_idle()
            await gate.wait_idle()
            # Only rows whose creates ended before the read are checked against it.
            suspects = checking = sorted(gate.suspects)
            for last in (False, True):
                answer = await self._upstream.members(gate.creation_batch_id)
                # Rows whose own outcome got recorded meanwhile are settled: leave them be.
                checking = _still_to_check(run, checking)
                if not answer.ok:
                    for n in checking:
                        message = (
                            "could not check the directory for this row; it may be there, "
                            f"so resume rather than upload it again: {answer.message}"
                        )
                        failed = ev.HospitalFailed(n, b.UNCONFIRMED, message, retryable=True)
                        await self._emit(run, failed, *_outcome_id(n, run.state.rows[n].attempts))
                    return
                checking = await self._match(run, gate, checking, answer.body, last)
                if not checking:
                    return
                # A row missing may be in a create the directory has started but not stored:
                # it serves requests in turn, so once this read is answered every create sent
                # before it has started, and stores within 5 s. A read settle_seconds later
                # shows them all (a create of it queued past its client's timeout, or
                # stalled with the directory, came back to store twice). The rows this read
                # found are recorded already: a second read that fails cannot unfind them.
                await self._pauses.sleep(self._settings.settle_seconds)
        finally:
            for n in suspects:
                gate.suspects.pop(n, None)
            gate.reconciling = None
            parked, gate.parked = gate.parked, []
            self._requeue(run, parked)
            await gate.notify()
            if gate.suspects and not self._stopping:  # suspected during the read: look again
                self._reconcile_soon(run, gate)

    async def _match(
        self,
        run: BatchRun,
        gate: Gate,
        suspects: list[int],
        records: list[dict[str, Any]],
        last: bool,
    ) -> list[int]:
        """Record the suspects found among the records no row holds (by name, address and
        phone); the rest are sent again after the `last` read, or returned to be looked for
        in the next."""
        rows = run.state.rows
        upstream = run.state.rows_of(gate.creation_batch_id)
        claimed = [r.record for r in upstream if r.hospital_id is not None]
        _, left = pair(claimed, sorted(records, key=lambda r: r.get("id", 0)))
        unclaimed: defaultdict[tuple[Any, ...], list[HospitalRecord]] = defaultdict(list)
        for record in map(HospitalRecord.of, left):
            unclaimed[record.values].append(record)
        missing: list[int] = []
        for n in suspects:
            attempt = rows[n].attempts
            if found := unclaimed.get(rows[n].row.values):
                record = found.pop(0)
                created = ev.HospitalCreated(
                    n, record.id, reconciled=True, created_at=record.created_at
                )
                await self._emit(run, created, *_outcome_id(n, attempt), cause="reconciliation")
            elif not last:
                missing.append(n)
            else:
                # The unclear answer is what an operator can act on: keep it in the message.
                message = "not in the directory when looked up"
                if (unclear := gate.suspects.get(n)) is not None:
                    message += f" after an unclear answer ({unclear})"
                await self._retry_later(run, n, attempt, b.NOT_STORED, message)
        extra = sum(map(len, unclaimed.values()))
        if extra and not missing:  # the records a row still missing may yet claim are not
            log.warning(
                "upstream batch %s holds %d record(s) that match no row of batch %s",
                gate.creation_batch_id,
                extra,
                run.batch_id,
            )
        return missing

    # Activating and rolling back --------------------------------------------------------------

    async def _activate(self, run: BatchRun) -> None:
        fact = await self._upstream.activate(run.state)
        await self._emit(run, fact, "activation", run.state.resumes, cause="activation")

    async def _roll_back(self, run: BatchRun) -> None:
        fact = await self._upstream.delete(run.state)
        # Each failed round is its own fact; a rollback that succeeds happens once.
        failed = isinstance(fact, ev.BatchRollbackFailed)
        parts = ("rollback", "failed", run.state.rollback_requests) if failed else ("rollback",)
        await self._emit(run, fact, *parts, cause="rollback")
