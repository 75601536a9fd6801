"""The shared /status body: reused while a batch runs, never across a change of status."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from unittest.mock import ANY

import pytest

from service.domain import events as ev
from service.projections import queries
from service.store.event_store import EventStore
from service.store.records import NewEvent
from service.web import presenters
from service.web.status_cache import StatusCache
from tests.integration.conftest import new_batch, requested


async def version_of(cache: StatusCache, store: EventStore, batch_id: str) -> int:
    body = await cache.body(store, batch_id)
    assert body is not None
    return int(json.loads(body)["version"])


async def status_of(cache: StatusCache, store: EventStore, batch_id: str) -> str:
    body = await cache.body(store, batch_id)
    assert body is not None
    return str(json.loads(body)["processing_status"])


async def test_a_running_batch_shares_its_body_until_it_is_too_old(store: EventStore) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=2))
    await store.append("batch-b", None, requested("b"))
    shared, fresh = StatusCache(max_age=60.0), StatusCache(max_age=0.0)
    assert await version_of(shared, store, "b") == 1

    await store.append("batch-b", None, requested("b"))

    assert await version_of(shared, store, "b") == 1  # same status, young body: reused
    assert await version_of(fresh, store, "b") == 2


async def test_a_change_of_status_is_never_hidden(store: EventStore) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=1))
    await store.append("batch-b", None, requested("b"))
    cache = StatusCache(max_age=60.0)
    assert await version_of(cache, store, "b") == 1

    await store.append("batch-b", None, [NewEvent(ev.HospitalFailed(1, "rejected", "no", False))])

    body = await cache.body(store, "b")
    assert body is not None
    assert json.loads(body)["processing_status"] == "failed"


async def test_a_resumed_batch_does_not_answer_its_finished_status(store: EventStore) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=1))
    await store.append("batch-b", None, requested("b"))
    await store.append("batch-b", None, [NewEvent(ev.HospitalFailed(1, "rejected", "no", False))])
    cache = StatusCache(max_age=60.0)
    assert await status_of(cache, store, "b") == "failed"

    await store.append("batch-b", None, [NewEvent(ev.BatchResumed((1,)))])

    assert await status_of(cache, store, "b") == "processing"  # finished to running, too


async def test_a_running_batch_without_new_events_still_counts_its_time(
    store: EventStore,
) -> None:
    # While a batch runs its processing_time_seconds runs to now (docs/events.md), also
    # when no event comes: a create takes 5 s, a wait for the rate window up to a minute.
    await store.append("batch-b", -1, new_batch("b", rows=1))
    await store.append("batch-b", None, requested("b"))
    cache = StatusCache(max_age=0.1)
    first = await cache.body(store, "b")
    await asyncio.sleep(0.35)  # older than twice max_age: this poller waits for a new body
    later = await cache.body(store, "b")

    assert first is not None and later is not None
    assert json.loads(later)["version"] == json.loads(first)["version"] == 1
    elapsed = [json.loads(body)["processing_time_seconds"] for body in (first, later)]
    assert elapsed[1] >= elapsed[0] + 0.3


async def test_an_unknown_batch_has_no_body(store: EventStore) -> None:
    assert await StatusCache(max_age=1.0).body(store, "nope") is None


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The batch id of every body built from here on; each build takes 50 ms more."""
    built: list[str] = []
    real = queries.status_snapshot

    async def counted(store: EventStore, batch_id: str) -> tuple[dict[str, Any], bytes] | None:
        built.append(batch_id)
        await asyncio.sleep(0.05)
        return await real(store, batch_id)

    monkeypatch.setattr(queries, "status_snapshot", counted)
    return built


async def test_pollers_arriving_together_share_one_build(
    store: EventStore, builds: list[str]
) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=3))
    cache = StatusCache(max_age=60.0)
    bodies = await asyncio.gather(*(cache.body(store, "b") for _ in range(10)))

    assert builds == ["b"]
    assert len(set(bodies)) == 1


async def test_bodies_are_kept_up_to_max_bytes_and_the_last_built_always(
    store: EventStore, builds: list[str]
) -> None:
    # With csv.max_rows raised, one body can be 10 MB: 64 of them would hold 0.6 GB.
    for batch_id in ("a", "b"):
        await store.append(f"batch-{batch_id}", -1, new_batch(batch_id, rows=50))
    sizes = {i: len(await StatusCache(max_age=60.0).body(store, i) or b"") for i in "ab"}
    builds.clear()
    # A running batch's body carries processing_time_seconds, whose digits vary from one
    # build to the next ("0.1", "0.153"): the budgets leave room for that, and no more.
    slack = 16
    assert min(sizes.values()) > 2 * slack

    roomy = StatusCache(max_age=60.0, max_bytes=sizes["a"] + sizes["b"] + slack)
    for batch_id in "abba":
        await roomy.body(store, batch_id)
    assert builds == ["a", "b"]  # both kept

    builds.clear()
    tight = StatusCache(max_age=60.0, max_bytes=max(sizes.values()) + slack)
    for batch_id in "abba":
        await tight.body(store, batch_id)
    assert builds == ["a", "b", "a"]  # b's build pushed a out, the last read stays

    builds.clear()
    tiny = StatusCache(max_age=60.0, max_bytes=1)
    for _ in range(3):
        await tiny.body(store, "a")
    assert builds == ["a"]


async def test_an_expired_body_is_answered_once_more_while_its_successor_is_built(
    store: EventStore,
) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=2))
    await store.append("batch-b", None, requested("b"))
    cache = StatusCache(max_age=1.0)
    assert await version_of(cache, store, "b") == 1
    await store.append("batch-b", None, requested("b"))
    await asyncio.sleep(1.1)  # older than max_age, younger than twice that

    assert await version_of(cache, store, "b") == 1  # stale, the rebuild is under way
    rebuilding = list(cache._building.values())
    assert rebuilding  # started by that answer, not left to a later poller
    await asyncio.wait_for(asyncio.gather(*rebuilding), 10)  # a read: quick, not instant
    assert await version_of(cache, store, "b") == 2


@pytest.mark.parametrize("max_age", [0.0, 0.3])
async def test_a_body_older_than_twice_max_age_waits_for_its_successor(
    store: EventStore, max_age: float
) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=2))
    await store.append("batch-b", None, requested("b"))
    cache = StatusCache(max_age=max_age)
    assert await version_of(cache, store, "b") == 1
    await store.append("batch-b", None, requested("b"))
    await asyncio.sleep(2 * max_age + 0.05)  # a poller that comes back later than that

    assert await version_of(cache, store, "b") == 2


async def test_the_numbers_and_the_rows_of_a_body_are_of_one_commit(store: EventStore) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=3) + requested("b"))
    folded_earlier = await queries.get_batch(store, "b")  # what a poller got from the fold
    created = [NewEvent(ev.HospitalCreated(n, 100 + n)) for n in (1, 2)]
    await store.append("batch-b", None, created)  # the log moved on meanwhile

    body = await StatusCache(max_age=0.0).body(store, "b", folded_earlier)

    assert body is not None
    status = json.loads(body)
    assert status["version"] == 3
    assert status["processed_hospitals"] == 2
    assert [h["status"] for h in status["hospitals"]] == ["created", "created", "pending"]


async def test_the_body_equals_the_presenters_for_every_kind_of_row(store: EventStore) -> None:
    rows = (
        ev.Row(1, 'St "Quoted" \\ Mary', "1 Main St", "555-0100", 2),
        ev.Row(2, "Hôpital Saint-Éloi ✚", "2 Rue\tde l'Église", None, 3),
        ev.Row(3, "Third", "3 Elm", "", 4),
    )
    created = ev.BatchCreated("b-json", "f.csv", rows, (ev.UpstreamBatch("b-json", (1, 2, 3)),))
    await store.append("batch-b-json", -1, [NewEvent(created)])
    outcomes = [
        ev.HospitalRequested((1, 2, 3), (1, 1, 1)),
        ev.HospitalCreated(1, 101),
        ev.HospitalRetryScheduled(3, 1, "server_error", "HTTP 503"),  # pending, with a message
        ev.HospitalFailed(2, "rejected", "name: too long", retryable=False),
    ]
    await store.append("batch-b-json", 0, [NewEvent(e) for e in outcomes])
    batch = await queries.get_batch(store, "b-json")
    assert batch is not None

    body = await StatusCache(max_age=0).body(store, "b-json")

    assert body is not None
    read = queries.row_dicts(await queries.get_row_values(store, "b-json"))
    expected = presenters.status(batch, read)
    assert json.loads(body) == {**expected, "processing_time_seconds": ANY}
    assert [h["row"] for h in json.loads(body)["hospitals"]] == [1, 2, 3]
    assert json.loads(body)["hospitals"][2]["error_message"] == "HTTP 503"


async def test_a_warmed_body_is_ready_for_the_first_poller(
    store: EventStore, builds: list[str]
) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=3))
    cache = StatusCache(max_age=60.0)
    warmed = await cache.warm(store, "b")

    assert await cache.body(store, "b") == warmed is not None
    assert builds == ["b"]


async def test_a_caller_that_has_the_batch_row_saves_the_read(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.append("batch-b", -1, new_batch("b", rows=3) + requested("b"))
    batch = await queries.get_batch(store, "b")
    assert batch is not None

    async def no_read(store: EventStore, batch_id: str) -> None:
        raise AssertionError("the batches table was read")

    monkeypatch.setattr(queries, "get_batch", no_read)
    body = await StatusCache(max_age=60.0).body(store, "b", batch)

    assert body is not None
    assert json.loads(body)["version"] == batch["stream_version"] == 1


async def test_a_rebuilt_body_counts_once_against_max_bytes(
    store: EventStore, builds: list[str]
) -> None:
    # Each new version of a batch replaces its body: counted again, the old ones would push
    # out bodies that fit.
    for batch_id in ("a", "b"):
        await store.append(f"batch-{batch_id}", -1, new_batch(batch_id, rows=50))
        await store.append(f"batch-{batch_id}", None, requested(batch_id))
    # b finished: its body stays good until its version moves (a running one's ages).
    failed = [NewEvent(ev.HospitalFailed(n, "rejected", "no", False)) for n in range(1, 51)]
    await store.append("batch-b", None, failed)
    sizes = {i: len(await StatusCache(max_age=60.0).body(store, i) or b"") for i in "ab"}
    builds.clear()
    slack = 16  # processing_time_seconds varies, as above
    cache = StatusCache(max_age=0.0, max_bytes=sizes["a"] + sizes["b"] + slack)
    await cache.body(store, "b")
    for _ in range(3):
        await store.append("batch-a", None, requested("a"))
        await cache.body(store, "a")
    await cache.body(store, "b")

    assert builds == ["b", "a", "a", "a"]  # b kept all along


async def test_bodies_that_fill_max_bytes_exactly_are_all_kept(
    store: EventStore, builds: list[str]
) -> None:
    for batch_id in ("a", "b"):  # failed, so their bodies do not change
        await store.append(f"batch-{batch_id}", -1, new_batch(batch_id, rows=1))
        await store.append(f"batch-{batch_id}", None, requested(batch_id))
        failed = NewEvent(ev.HospitalFailed(1, "rejected", "no", False))
        await store.append(f"batch-{batch_id}", None, [failed])
    sizes = {i: len(await StatusCache(max_age=60.0).body(store, i) or b"") for i in "ab"}
    builds.clear()
    cache = StatusCache(max_age=60.0, max_bytes=sizes["a"] + sizes["b"])
    for batch_id in "abba":
        await cache.body(store, batch_id)

    assert builds == ["a", "b"]


async def test_bodies_are_kept_up_to_size_of_them(store: EventStore, builds: list[str]) -> None:
    for batch_id in "abc":
        await store.append(f"batch-{batch_id}", -1, new_batch(batch_id))
    cache = StatusCache(max_age=60.0, size=2)
    for batch_id in "ababcb":
        await cache.body(store, batch_id)
    assert builds == ["a", "b", "c"]  # c pushed out a, read longest ago
    await cache.body(store, "a")
    assert builds == ["a", "b", "c", "a"]


async def test_a_build_under_way_is_not_shared_across_a_change_of_status(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first poller's build has read the running batch and is still encoding it when a
    # row fails: a poller that then sees `failed` must not get that build's body.
    await store.append("batch-b", -1, new_batch("b", rows=1))
    await store.append("batch-b", None, requested("b"))
    real = queries.status_snapshot
    read, release = asyncio.Event(), asyncio.Event()

    async def slow_first(store: EventStore, batch_id: str) -> tuple[dict[str, Any], bytes] | None:
        snapshot = await real(store, batch_id)
        if not read.is_set():
            read.set()
            await release.wait()
        return snapshot

    monkeypatch.setattr(queries, "status_snapshot", slow_first)
    cache = StatusCache(max_age=60.0)
    first = asyncio.create_task(status_of(cache, store, "b"))
    await read.wait()
    await store.append("batch-b", None, [NewEvent(ev.HospitalFailed(1, "rejected", "no", False))])
    later = asyncio.create_task(status_of(cache, store, "b"))
    await asyncio.sleep(0.05)
    release.set()

    assert await first == "processing"
    assert await later == "failed"
