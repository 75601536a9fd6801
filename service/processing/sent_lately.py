"""What the log says of the creates sent lately, for the pacer a start builds."""

from __future__ import annotations

import time
from datetime import datetime

from service.domain import batch as b
from service.domain import events as ev
from service.store.event_store import EventStore
from service.store.records import EVENT_COLUMNS, from_row

LATELY_SCANNED = 10_000  # newest events read for creates the window still counts

# Outcomes of a create that was never sent (withdrawn, or no connection to the directory):
# it takes no place in the directory's window.
NEVER_SENT = frozenset({b.WITHDRAWN, b.UNREACHABLE})


async def sent_lately(store: EventStore, seconds: float) -> list[float]:
    """Times no earlier than each create of the last `seconds` was sent, on the monotonic
    clock, oldest first (from the newest LATELY_SCANNED events).

    A create is dated by its outcome, recorded after its answer: its intent is recorded
    before it, and before the row waited for room in the window. One whose intent has no
    outcome (in flight at a crash) is dated now; one withdrawn or never sent is not counted.
    """
    now = time.time()
    rows = await store.select(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE global_position > ? "
        "AND event_type IN (?, ?, ?, ?) ORDER BY global_position",
        (
            store.head.position - LATELY_SCANNED,
            ev.HospitalRequested.type_name,
            ev.HospitalCreated.type_name,
            ev.HospitalFailed.type_name,
            ev.HospitalRetryScheduled.type_name,
        ),
    )
    answered: list[float] = []  # wall-clock times, in log order
    unanswered: dict[tuple[str, int], float] = {}
    for stored in map(from_row, rows):
        at = datetime.fromisoformat(stored.recorded_at).timestamp()
        match stored.decode():
            case ev.HospitalRequested(rows=requested):
                unanswered.update(((stored.stream_id, n), at) for n in requested)
            case ev.HospitalCreated(row=n):
                unanswered.pop((stored.stream_id, n), None)
                answered.append(at)
            case (
                ev.HospitalFailed(row=n, reason=reason)
                | ev.HospitalRetryScheduled(row=n, reason=reason)
            ):
                unanswered.pop((stored.stream_id, n), None)
                if reason not in NEVER_SENT:
                    answered.append(at)
    # The log's times are the wall clock's, which may have stepped since (an NTP correction
    # between a crash and this start, a VM resumed). An answer came before now, and each
    # before the next in the log: read newest first, the newest is put no later than now (a
    # log recorded ahead of the clock is moved back whole) and each no later than the next.
    ahead = max(0.0, answered[-1] - now) if answered else 0.0
    sent: list[float] = []
    latest = now
    for at in reversed(answered):
        latest = min(at - ahead, latest)
        if latest < now - seconds:
            break
        sent.append(latest)
    sent.reverse()
    sent += [now for at in unanswered.values() if at - ahead >= now - seconds]
    clock_gap = now - time.monotonic()
    return [at - clock_gap for at in sent]
