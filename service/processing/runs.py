"""In-memory bookkeeping of the batches the processor works on; the log stays the truth."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from service.domain import batch as b
from service.domain import events as ev
from service.processing.outbox import Outbox
from service.store.records import StoredEvent


@dataclass(eq=False)
class Gate:
    """One upstream batch: its creates in flight, and the rows to look for in the directory.

    While rows are being reconciled the gate is shut: no new create of this upstream
    batch starts, and the directory is read only once every create in flight has ended,
    so a record is never claimed by a reconciled row and by its own worker.
    """

    creation_batch_id: str
    in_flight: int = 0
    # Rows to look for, each with the unclear answer its create got, if one came.
    suspects: dict[int, str | None] = field(default_factory=dict)
    last_suspect_at: float = 0.0
    reconciling: asyncio.Task[None] | None = None
    parked: list[int] = field(default_factory=list)  # rows taken while reconciling: held
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def suspect(self, row: int, answer: str | None = None) -> None:
        """A create of `row` may have been stored (`answer`: what came back, if anything):
        look for it before sending again."""
        self.suspects[row] = answer if answer is not None else self.suspects.get(row)
        self.last_suspect_at = time.monotonic()

    def settle_left(self, settle_seconds: float) -> float:
        """Seconds until the last suspect's create has had `settle_seconds` to be stored."""
        return self.last_suspect_at + settle_seconds - time.monotonic()

    async def notify(self) -> None:
        """Wake whoever waits on this gate."""
        async with self.changed:
            self.changed.notify_all()

    async def wait_idle(self) -> None:
        """Until no create of this upstream batch is in flight."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.in_flight == 0)

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.reconciling is not None or bool(self.suspects)


@dataclass(eq=False)
class BatchRun:
    """A batch being worked on: its fold, the rows waiting for a worker, its gates."""

    state: b.BatchState
    queue: deque[int] = field(default_factory=deque)
    # Rows with a worker, waiting to retry, or set aside while their upstream batch is checked.
    held: set[int] = field(default_factory=set)
    scheduled: bool = False  # in the processor's round-robin line
    gates: dict[str, Gate] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None  # activation or rollback under way
    outbox: Outbox | None = None  # the facts its workers emit, appended together
    at_window: int = 0  # rows got ready and waiting for the rate window's room
    # Told each change of status, a rollback's end and each refused rollback: neither of the
    # last two need change the status (a batch may read `failed` or `completed` already).
    on_status: Callable[[b.BatchState], object] | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    _early: dict[int, StoredEvent] = field(default_factory=dict)

    @property
    def batch_id(self) -> str:
        return self.state.batch_id

    def gate(self, creation_batch_id: str) -> Gate:
        """The gate of one upstream batch."""
        if creation_batch_id not in self.gates:
            self.gates[creation_batch_id] = Gate(creation_batch_id)
        return self.gates[creation_batch_id]

    def absorb(self, stored: list[StoredEvent]) -> None:
        """Fold committed events into the state in stream order, whatever order they came in."""
        status, rolled_back = self.state.status, self.state.rolled_back
        refused = False  # a rollback refused again leaves the status as it was
        for event in stored:
            if event.stream_version > self.state.version:
                self._early[event.stream_version] = event
        while self.state.version + 1 in self._early:
            next_event = self._early.pop(self.state.version + 1)
            decoded = next_event.decode()
            b.apply(self.state, decoded, next_event.recorded_at)
            refused |= isinstance(decoded, ev.BatchRollbackFailed)
        changed = self.state.status != status or self.state.rolled_back != rolled_back
        if self.on_status is not None and (changed or refused):
            self.on_status(self.state)

    @property
    def idle(self) -> bool:
        """No row queued or in flight, nothing being reconciled, activated or rolled back."""
        return (
            not self.queue
            and not self.held
            and self.task is None
            and not any(g.busy for g in self.gates.values())
        )
