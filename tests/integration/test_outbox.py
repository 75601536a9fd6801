"""The outbox on a real store: facts emitted meanwhile share an append, intents share an event."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from service.domain import batch as b
from service.domain import events as ev
from service.processing.outbox import Outbox
from service.store.event_store import EventStore
from service.store.records import NewEvent
from tests.integration.conftest import new_batch

BATCH = "b-outbox"
STREAM = b.stream_id(BATCH)


def intent(rows: tuple[int, ...], attempts: tuple[int, ...]) -> NewEvent:
    return NewEvent(ev.HospitalRequested(rows, attempts))


def spawn(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.create_task(work)


async def outbox_of(store: EventStore, rows: int = 3) -> tuple[Outbox, list[int]]:
    """An outbox on a new batch's stream, and the size of every append it makes."""
    await store.append(STREAM, -1, new_batch(BATCH, rows=rows))
    sizes: list[int] = []

    async def append(news: list[NewEvent]) -> Any:
        sizes.append(len(news))
        return await store.append(STREAM, None, news)

    return Outbox(append, intent, spawn), sizes


async def test_facts_emitted_while_an_append_commits_go_together_into_the_next(
    store: EventStore,
) -> None:
    outbox, sizes = await outbox_of(store)
    first = asyncio.create_task(outbox.emit(NewEvent(ev.HospitalCreated(1, 101))))
    await asyncio.sleep(0)  # the first append is under way
    later = [outbox.emit(NewEvent(ev.HospitalCreated(n, 100 + n))) for n in (2, 3)]

    results = await asyncio.gather(first, *later)

    assert sizes == [1, 2]
    assert [e.stream_version for e in results[1]] == [2, 3]
    assert results[1] == results[2]  # each waiter gets its whole append
    log = await store.read_stream(STREAM, after_version=0)
    assert [e.decode() for e in log] == [ev.HospitalCreated(n, 100 + n) for n in (1, 2, 3)]


async def test_rows_requested_together_share_one_intent_event(store: EventStore) -> None:
    outbox, sizes = await outbox_of(store)

    await asyncio.gather(outbox.request(1, 1), outbox.request(3, 2), outbox.request(2, 1))

    assert sizes == [1]
    (stored,) = await store.read_stream(STREAM, after_version=0)
    assert stored.decode() == ev.HospitalRequested((1, 3, 2), (1, 2, 1))


async def test_rows_requested_once_an_intent_is_on_its_way_get_an_intent_of_their_own(
    store: EventStore,
) -> None:
    outbox, sizes = await outbox_of(store)
    first = asyncio.create_task(outbox.request(1, 1))
    while not sizes:  # until the first intent is built and its append under way
        await asyncio.sleep(0)

    await asyncio.gather(first, outbox.request(2, 1))
    await outbox.request(3, 1)

    # A row sent without its intent in the log would be sent again after a crash.
    assert sizes == [1, 1, 1]
    log = await store.read_stream(STREAM, after_version=0)
    assert [e.decode() for e in log] == [ev.HospitalRequested((n,), (1,)) for n in (1, 2, 3)]


async def test_a_refused_fact_fails_alone(store: EventStore) -> None:
    outbox, sizes = await outbox_of(store, rows=2)
    first = asyncio.create_task(outbox.emit(NewEvent(ev.HospitalCreated(1, 101))))
    await asyncio.sleep(0)
    no_such_row = outbox.emit(NewEvent(ev.HospitalCreated(9, 109)))
    fine = outbox.emit(NewEvent(ev.HospitalCreated(2, 102)))

    results = await asyncio.gather(first, no_such_row, fine, return_exceptions=True)

    assert isinstance(results[1], ValueError) and "no row 9" in str(results[1])
    assert sizes == [1, 2, 1, 1]  # the pair was refused, then each was tried alone
    log = await store.read_stream(STREAM)
    assert [e.decode() for e in log[1:]] == [ev.HospitalCreated(1, 101), ev.HospitalCreated(2, 102)]


async def test_the_outbox_drains_again_after_going_idle(store: EventStore) -> None:
    outbox, sizes = await outbox_of(store)
    await outbox.emit(NewEvent(ev.HospitalCreated(1, 101)))
    await outbox.emit(NewEvent(ev.HospitalCreated(2, 102)))

    assert sizes == [1, 1]
    assert await store.stream_version(STREAM) == 2
