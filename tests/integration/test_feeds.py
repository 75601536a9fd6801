"""One feed per followed stream: folded and encoded once, shared, dropped with its last follower."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from service.domain import events as ev
from service.store.event_store import EventStore
from service.store.records import NewEvent, StoredEvent
from service.web import feeds as feeds_module
from service.web.feeds import Feeds, Message
from tests.integration.conftest import new_batch, requested
from tests.support import without_collections


def payload(frame: bytes) -> Any:
    """The JSON of a frame the tests' messages are big enough for: a 16-bit length header."""
    assert frame[:2] == b"\x81\x7e"
    return orjson.loads(frame[4:])


async def test_followers_share_one_feed_until_the_last_leaves(store: EventStore) -> None:
    await store.append("batch-b", -1, new_batch("b") + requested("b", 2))
    feeds = Feeds()

    async with feeds.follow(store, "batch-b") as first, feeds.follow(store, "batch-b") as same:
        await first.wait_past(1)
        assert same is first
        messages = list(first.messages)
    async with feeds.follow(store, "batch-b") as later:
        await later.wait_past(1)

    assert later is not first
    assert [payload(m.frame)["version"] for m in messages] == [0, 1, 2]
    assert [m.frame for m in later.messages] == [m.frame for m in messages]


async def test_each_message_carries_the_event_and_the_progress_after_it(store: EventStore) -> None:
    stored = await store.append("batch-b", -1, new_batch("b", rows=2) + requested("b"))
    created = NewEvent(ev.HospitalCreated(row=1, hospital_id=7))
    stored += await store.append("batch-b", 1, [created])
    feeds = Feeds()

    async with feeds.follow(store, "batch-b") as feed:
        await feed.wait_past(1)
        bodies = [payload(m.frame) for m in feed.messages]

    assert [b["event"] for b in bodies] == [orjson.loads(orjson.dumps(e.to_json())) for e in stored]
    assert [b["progress"]["processed_hospitals"] for b in bodies] == [0, 0, 1]
    assert [m.position for m in feed.messages] == [e.global_position for e in stored]


async def test_the_finished_message_comes_with_the_event_that_settles_the_batch(
    store: EventStore,
) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=1))
    created = NewEvent(ev.HospitalCreated(row=1, hospital_id=7))
    activated = NewEvent(ev.BatchActivated(activated_count=1, upstream_batch_ids=("b",)))
    await store.append("batch-b", 0, [created, activated])
    feeds = Feeds()

    async with feeds.follow(store, "batch-b") as feed:
        await feed.wait_past(1)
        finished = [m.finished for m in feed.messages]
        last = feed.finished_message(2)

    assert finished[:2] == [None, None]
    assert last is not None and last == finished[2]
    assert orjson.loads(last)["type"] == "finished"
    assert orjson.loads(last)["progress"]["processing_status"] == "completed"
    assert feed.finished_message(-1) is None


async def test_a_burst_ends_at_the_event_that_finishes_the_batch(store: EventStore) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=1))
    created = NewEvent(ev.HospitalCreated(row=1, hospital_id=7))
    activated = NewEvent(ev.BatchActivated(activated_count=1, upstream_batch_ids=("b",)))
    asked = NewEvent(ev.BatchRollbackRequested())  # committed with the finish, after it
    await store.append("batch-b", 0, [created, activated, asked])

    async with Feeds().follow(store, "batch-b") as feed:
        await feed.wait_past(2)
        assert feed.messages[2].finished is not None
        _, upto = feed.burst(0)

    assert upto == 2  # a socket sends `finished` and closes; the rollback is not its story


async def test_sockets_at_one_version_share_a_burst_until_the_next_message(
    store: EventStore,
) -> None:
    stored = await store.append("batch-b", -1, new_batch("b") + requested("b", 2))
    async with Feeds().follow(store, "batch-b") as feed:
        await feed.wait_past(1)
        frames, upto = feed.burst(0)
        shared = feed.burst(0)
        first_past = [feed.first_past(e.global_position) for e in stored]
        stored += await store.append("batch-b", 2, requested("b", 1))
        await feed.wait_past(2)
        longer = feed.burst(0)

    assert shared[0] is frames  # built once
    assert (frames, upto) == (feed.messages[1].frame + feed.messages[2].frame, 2)
    assert longer == (frames + feed.messages[3].frame, 3)
    assert first_past == [1, 2, None]  # nothing after the last event, until it comes


async def test_a_burst_holds_one_message_at_least_and_burst_bytes_at_most(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.append("batch-b", -1, new_batch("b") + requested("b", 3))
    async with Feeds().follow(store, "batch-b") as feed:
        await feed.wait_past(2)
        monkeypatch.setattr(feeds_module, "BURST_BYTES", len(feed.messages[1].frame) + 1)
        bursts = [feed.burst(0)[1], feed.burst(2)[1]]
        monkeypatch.setattr(feeds_module, "BURST_BYTES", 1)
        one = feed.burst(1)

    assert bursts == [2, 3]  # past BURST_BYTES with the second message; the last one alone
    assert one == (feed.messages[2].frame, 2)


@pytest.fixture
async def failing_store(store: EventStore) -> AsyncIterator[EventStore]:
    """A store whose stream reads fail a moment after the first event."""

    async def follow(stream_id: str, after_version: int) -> AsyncIterator[StoredEvent]:
        assert after_version == 0  # the feed read the first event itself
        await asyncio.sleep(0.05)  # the follower is waiting for the next event by then
        raise OSError("disk gone")
        yield  # an async generator, as follow() is

    await store.append("batch-b", -1, new_batch("b"))
    store.follow = follow  # type: ignore[method-assign,assignment]
    yield store


async def test_followers_are_told_when_the_feed_cannot_read(failing_store: EventStore) -> None:
    async with Feeds().follow(failing_store, "batch-b") as feed:
        await feed.wait_past(-1)
        async with asyncio.timeout(5):
            with pytest.raises(RuntimeError) as raised:
                await feed.wait_past(0)

    assert isinstance(raised.value.__cause__, OSError)
    assert [type(m) for m in feed.messages] == [Message]


async def test_a_feed_reads_the_events_so_far_off_the_event_loop(
    store: EventStore, decoded_on: list[int]
) -> None:
    # A 50,000-row batch took 0.5-0.8 s to decode and fold for its first follower, and the
    # loop, with every other request, waited that long.
    await store.append("batch-b", -1, new_batch("b", rows=3) + requested("b", 2))
    decoded_on.clear()  # counted from the follow on
    async with Feeds().follow(store, "batch-b") as feed:
        await feed.wait_past(1)
        so_far = [payload(m.frame)["version"] for m in feed.messages]
        snapshot = orjson.loads(feed.snapshot())
        await store.append("batch-b", 2, [NewEvent(ev.HospitalCreated(row=1, hospital_id=7))])
        await feed.wait_past(2)
        later = payload(feed.messages[3].frame)

    assert len(decoded_on) == 3 and threading.get_ident() not in decoded_on
    assert so_far == [0, 1, 2]  # all of them at once: none before the fold was done
    assert snapshot["version"] == 2 and snapshot["progress"]["total_hospitals"] == 3
    assert later["version"] == 3 and later["progress"]["processed_hospitals"] == 1


async def test_a_feed_keeps_the_events_it_read_so_far_only_as_messages(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The undecoded rows of a 10,000-event batch took half as much memory again as its
    # messages, and a feed held them for as long as anyone followed the batch.
    await store.append("batch-b", -1, new_batch("b", rows=3) + requested("b", 2))
    read: list[tuple[Any, ...]] = []
    stream_rows = store.stream_rows

    async def noting_a_row(*args: Any) -> list[tuple[Any, ...]]:
        page = await stream_rows(*args)
        read.extend(page[:1])
        return page

    monkeypatch.setattr(store, "stream_rows", noting_a_row)
    async with Feeds().follow(store, "batch-b") as feed:
        await feed.wait_past(1)
        gc.collect()
        holders = holders_of_the_first(read)

    assert holders == []


def holders_of_the_first(found: list[Any]) -> list[Any]:
    """What refers to `found[0]` besides `found`; in a plain function because from Python
    3.14 a coroutine counts as a referrer of a value it is evaluating."""
    return [x for x in gc.get_referrers(found[0]) if x is not found]


async def test_a_feed_its_last_follower_left_goes_without_a_garbage_collection(
    store: EventStore,
) -> None:
    # Its cancelled reading task kept the CancelledError, whose traceback held the reading
    # frame and so the feed, with every message of its batch: a cycle that only a full
    # collection frees, and none ran in a 36-minute soak of the service.
    await store.append("batch-b", -1, new_batch("b") + requested("b", 2))
    with without_collections():
        async with Feeds().follow(store, "batch-b") as feed:
            await feed.wait_past(1)
        gone = weakref.ref(feed)
        del feed
        assert gone() is None


async def test_the_first_snapshot_is_the_one_built_off_the_event_loop(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The catch-up builds the snapshot in its thread: a socket asking for it then must not
    # build it again on the loop (a 50,000-row batch's takes most of a second).
    await store.append("batch-b", -1, new_batch("b", rows=3) + requested("b", 2))
    built_on: list[int] = []
    whole = feeds_module._whole

    def noting_the_thread(kind: str, state: Any) -> bytes:
        built_on.append(threading.get_ident())
        return whole(kind, state)

    monkeypatch.setattr(feeds_module, "_whole", noting_the_thread)
    async with Feeds().follow(store, "batch-b") as feed:
        await feed.wait_past(1)
        snapshot = orjson.loads(feed.snapshot())

    assert len(built_on) == 1 and threading.get_ident() not in built_on
    assert snapshot["type"] == "snapshot" and snapshot["version"] == 2


async def test_a_feed_that_could_not_read_goes_with_its_last_follower(
    failing_store: EventStore,
) -> None:
    with without_collections():
        async with Feeds().follow(failing_store, "batch-b") as feed:
            await feed.wait_past(-1)
            with pytest.raises(RuntimeError):
                await feed.wait_past(0)
        gone = weakref.ref(feed)
        del feed
        assert gone() is None
