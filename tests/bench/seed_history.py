"""Build a database holding a long history: 1,000,000 events in 50,000 batches of 20 rows.

The events go through `EventStore.append` with the service's projector, as the service
writes them, so the read models and checkpoints are the ones a long-lived service has.
Each append is one batch's whole stream and many are in flight at once, so the store's
group commit puts hundreds of them in each transaction.

A completed 20-row batch takes 23 events (BatchCreated, one HospitalRequested for the 20
rows its workers take up together, a HospitalCreated per row, BatchActivated), so
1,000,000 events over 50,000 batches is reached with shorter streams too: 42,481
completed batches, 20 partially completed ones (one row refused, 22 events) and 7,499
rolled back before any create (3 events each). Every batch is finished, so a service
started on the database has nothing to recover.

    python -m tests.bench.seed_history PATH
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from service.domain import batch as b
from service.domain import events as ev
from service.projections import batches
from service.store.event_store import EventStore
from service.store.head_mark import SUFFIX as MARK
from service.store.records import NewEvent

ROWS = 20
KINDS = {"completed": 42_481, "partially_completed": 20, "rolled_back": 7_499}
EVENTS = {"completed": 3 + ROWS, "partially_completed": 2 + ROWS, "rolled_back": 3}
TOTAL_BATCHES = sum(KINDS.values())
TOTAL_EVENTS = sum(KINDS[k] * EVENTS[k] for k in KINDS)
SIDECARS = ("-wal", "-shm", MARK)  # the files that go with the database when it is renamed
IN_FLIGHT = 1024  # appends handed to the store at once: several group commits' worth
METADATA = {"actor": "processor", "cause": "processing"}


def history(index: int, kind: str) -> tuple[str, list[ev.Event]]:
    """One batch's stream id and events, for a batch that ended as `kind`."""
    batch_id = str(uuid.UUID(int=random.Random(index).getrandbits(128), version=4))
    rows = tuple(
        ev.Row(n, f"Hospital {index}-{n}", f"{n} Main Street, Town {index}", f"555-{n:04d}", n + 1)
        for n in range(1, ROWS + 1)
    )
    sha = hashlib.sha256(f"history-{index}".encode()).hexdigest()
    created = b.plan(batch_id, f"history-{index}.csv", rows, ROWS, sha)
    upstream = created.upstream_batches[0].creation_batch_id
    events: list[ev.Event] = [created]
    if kind == "rolled_back":
        events += [ev.BatchRollbackRequested(), ev.BatchRolledBack(0, (upstream,))]
        return b.stream_id(batch_id), events
    events.append(ev.HospitalRequested(tuple(range(1, ROWS + 1)), (1,) * ROWS))
    for n in range(1, ROWS + 1):
        if kind == "partially_completed" and n == ROWS:
            message = "the directory refused the row (HTTP 422): name: Field required"
            events.append(ev.HospitalFailed(n, "rejected", message, retryable=False))
        else:
            events.append(ev.HospitalCreated(n, index * ROWS + n))
    if kind == "completed":
        events.append(ev.BatchActivated(ROWS, (upstream,)))
    return b.stream_id(batch_id), events


def plan() -> Iterator[tuple[str, list[ev.Event]]]:
    """Every batch of the history, the kinds mixed in a fixed order."""
    kinds = [kind for kind, count in KINDS.items() for _ in range(count)]
    random.Random(0).shuffle(kinds)
    for index, kind in enumerate(kinds):
        yield history(index, kind)


async def seed(path: Path) -> int:
    """Append the whole history to a new database at `path`; the number of events."""
    store = EventStore(path, projectors=[batches.project])
    await store.open()
    try:
        pending: set[asyncio.Task[object]] = set()
        for stream, events in plan():
            news = [NewEvent(e, metadata=METADATA) for e in events]
            pending.add(asyncio.create_task(store.append(stream, -1, news)))
            if len(pending) >= IN_FLIGHT:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        await asyncio.gather(*pending)
        return store.head.position
    finally:
        await store.close()


def main(argv: list[str]) -> int:
    """Build the database at the path given; prints events, seconds and rate as JSON."""
    if len(argv) != 1:
        print("usage: python -m tests.bench.seed_history PATH", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if path.exists():
        print(f"error: {path} exists; give a new path", file=sys.stderr)
        return 2
    # Built under another name and renamed at the end: a cut-off build is never reused.
    partial = path.with_name(path.name + ".partial")
    for leftover in (partial, *(partial.with_name(partial.name + s) for s in SIDECARS)):
        leftover.unlink(missing_ok=True)
    started = time.perf_counter()
    count = asyncio.run(seed(partial))
    seconds = time.perf_counter() - started
    if count != TOTAL_EVENTS:
        print(f"error: {count} events stored, {TOTAL_EVENTS} planned", file=sys.stderr)
        return 1
    for suffix in ("", *SIDECARS):  # closing the store normally leaves no -wal behind
        built = partial.with_name(partial.name + suffix)
        if built.exists():
            built.rename(path.with_name(path.name + suffix))
    print(
        json.dumps({"events": count, "seconds": round(seconds, 1), "rate": round(count / seconds)})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
