"""Test helper: append three-event batches until killed, printing each committed position.

Usage: python append_forever.py DATABASE, with PYTHONPATH set to the project root (as
test_store_durability runs it). Four appends at a time, so kills land in group commits too.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from service.domain import events as ev
from service.projections import batches
from service.store.event_store import EventStore
from service.store.records import NewEvent
from tests.integration.conftest import new_batch, requested


def three_events(batch_id: str) -> list[NewEvent]:
    return new_batch(batch_id) + requested(batch_id) + [NewEvent(ev.HospitalCreated(1, 100))]


async def append_forever(path: str) -> None:
    store = EventStore(path, projectors=[batches.project])
    await store.open()
    try:
        while True:
            ids = [str(uuid.uuid4()) for _ in range(4)]
            appended = await asyncio.gather(
                *(store.append(f"batch-{i}", -1, three_events(i)) for i in ids)
            )
            for events in appended:
                for event in events:
                    print(event.global_position, flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(append_forever(sys.argv[1]))
