"""Injected faults, restarts and the inspection API that proves exactly-once creation."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from service.local_directory import DirectoryOptions, RunningDirectory, StandIn, run_directory
from tests.support import creates_entered

DELAY = 0.2


@pytest.fixture
async def directory() -> AsyncIterator[RunningDirectory]:
    async with run_directory(DirectoryOptions(create_delay=DELAY)) as running:
        yield running


@pytest.fixture
async def standin(directory: RunningDirectory) -> StandIn:
    return directory.standin


@pytest.fixture
async def http(directory: RunningDirectory) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(directory.url) as session:
        yield session


@pytest.fixture
def batch() -> str:
    return str(uuid4())


def hospital(batch: str, name: str = "General") -> dict[str, Any]:
    return {"name": name, "address": "1 Main St", "phone": None, "creation_batch_id": batch}


async def create(http: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, str]:
    async with http.post("/hospitals/", json=body) as response:
        return response.status, await response.text()


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_status_faults_answer_in_place_of_the_directory(
    http: aiohttp.ClientSession, standin: StandIn, batch: str, status: int
) -> None:
    standin.set_delay(0.0)
    standin.add_fault("create", str(status), nth=2)

    outcomes = [await create(http, hospital(batch, f"H{n}")) for n in range(3)]

    assert [code for code, _ in outcomes] == [200, status, 200]
    assert [h["name"] for h in standin.hospitals_in_batch(batch)] == ["H0", "H2"]
    if status == 429:
        assert outcomes[1][1] == '{"error":"Rate limit exceeded: 30 per 1 minute"}'


async def test_scripted_faults_strike_exactly_the_nth_requests(
    http: aiohttp.ClientSession, standin: StandIn, batch: str
) -> None:
    standin.set_delay(0.0)
    standin.add_fault("create", "503", nth=[3, 7])

    statuses = [(await create(http, hospital(batch)))[0] for _ in range(8)]

    assert [n for n, status in enumerate(statuses, start=1) if status == 503] == [3, 7]


async def test_random_faults_follow_their_seed(
    http: aiohttp.ClientSession, standin: StandIn
) -> None:
    draws = random.Random(42)
    expected = [500 if draws.random() < 0.5 else 200 for _ in range(12)]
    standin.add_fault("root", "500", probability=0.5, seed=42)

    statuses = []
    for _ in range(12):
        async with http.get("/") as response:
            statuses.append(response.status)

    assert statuses == expected
    assert {200, 500} <= set(statuses)


async def test_reset_drops_the_connection_and_stores_nothing(
    http: aiohttp.ClientSession, standin: StandIn, batch: str
) -> None:
    standin.add_fault("create", "reset", nth=1)

    with pytest.raises(aiohttp.ClientConnectionError):
        await create(http, hospital(batch))
    await asyncio.sleep(DELAY + 0.1)

    assert standin.hospitals_in_batch(batch) == []
    assert (await create(http, hospital(batch)))[0] == 200


async def test_hang_answers_nothing_stores_nothing_and_frees_its_slot_when_the_client_leaves(
    batch: str,
) -> None:
    options = DirectoryOptions(create_delay=0.0, handlers=1)
    async with run_directory(options) as directory, aiohttp.ClientSession(directory.url) as http:
        directory.standin.add_fault("create", "hang", nth=1)

        with pytest.raises(TimeoutError):
            await http.post(
                "/hospitals/", json=hospital(batch), timeout=aiohttp.ClientTimeout(total=0.3)
            )
        await asyncio.sleep(0.2)

        assert directory.standin.hospitals_in_batch(batch) == []
        status, _ = await asyncio.wait_for(create(http, hospital(batch)), timeout=1.0)
        assert status == 200


async def test_commit_drop_stores_the_hospital_then_drops_the_connection(
    http: aiohttp.ClientSession, standin: StandIn, batch: str
) -> None:
    standin.add_fault("create", "commit_drop", nth=1)

    with pytest.raises(aiohttp.ClientConnectionError):
        await create(http, hospital(batch, "Committed"))

    async with http.get(f"/hospitals/batch/{batch}") as response:
        assert response.status == 200
        assert [h["name"] for h in await response.json()] == ["Committed"]


@pytest.mark.parametrize("kind", ["commit_502", "commit_504"])
async def test_a_commit_then_5xx_stores_the_hospital_and_answers_as_the_proxy(
    http: aiohttp.ClientSession, standin: StandIn, batch: str, kind: str
) -> None:
    standin.add_fault("create", kind, nth=1)

    status, _ = await create(http, hospital(batch, "Committed"))

    assert status == int(kind.removeprefix("commit_"))
    assert [h["name"] for h in standin.hospitals_in_batch(batch)] == ["Committed"]


async def test_commit_drop_on_activation_leaves_the_batch_active(
    http: aiohttp.ClientSession, standin: StandIn, batch: str
) -> None:
    await create(http, hospital(batch))
    standin.add_fault("batch_activate", "commit_drop", nth=1)

    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.patch(f"/hospitals/batch/{batch}/activate"):
            pass

    assert [h["active"] for h in standin.hospitals_in_batch(batch)] == [True]


async def test_request_counts_include_refused_and_faulted_requests(
    http: aiohttp.ClientSession, standin: StandIn, batch: str
) -> None:
    standin.add_fault("root", "502")
    await create(http, {"name": "no address"})
    for _ in range(2):
        async with http.get("/") as response:
            assert response.status == 502
    async with http.get(f"/hospitals/batch/{batch}") as response:
        assert response.status == 404
    async with http.get("/health") as response:
        assert response.status == 404

    assert standin.request_counts == {"create": 1, "root": 2, "batch_get": 1}


async def test_clear_faults_restores_normal_answers(
    http: aiohttp.ClientSession, standin: StandIn
) -> None:
    standin.add_fault("root", "500")
    standin.clear_faults()

    async with http.get("/") as response:
        assert response.status == 200


async def test_restart_wipes_hospitals_ids_and_rate_windows(
    http: aiohttp.ClientSession, standin: StandIn, batch: str
) -> None:
    standin.set_delay(0.0)
    for _ in range(30):
        await create(http, hospital(batch))
    assert (await create(http, hospital(batch)))[0] == 429

    standin.restart()

    async with http.get(f"/hospitals/batch/{batch}") as response:
        assert response.status == 404
    async with http.get("/hospitals/") as response:
        assert await response.json() == []
    status, text = await create(http, hospital(batch))
    assert status == 200
    assert '"id":1,' in text


async def test_restart_kills_creates_in_flight(
    http: aiohttp.ClientSession,
    directory: RunningDirectory,
    batch: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    standin = directory.standin
    entered = creates_entered(directory, monkeypatch)
    in_flight = asyncio.create_task(create(http, hospital(batch)))
    await asyncio.wait_for(entered.wait(), 10)  # in its delay, not stored yet

    standin.restart()

    with pytest.raises(aiohttp.ClientConnectionError):
        await in_flight
    await asyncio.sleep(DELAY)
    assert standin.all_hospitals() == []


async def test_restart_kills_creates_waiting_for_a_handler(
    batch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = DirectoryOptions(create_delay=DELAY, handlers=1)
    async with run_directory(options) as directory, aiohttp.ClientSession(directory.url) as http:
        standin = directory.standin
        entered = creates_entered(directory, monkeypatch)
        in_flight = asyncio.create_task(create(http, hospital(batch, "In its delay")))
        await asyncio.wait_for(entered.wait(), 10)
        queued = asyncio.create_task(create(http, hospital(batch, "Waiting for a handler")))
        async with asyncio.timeout(10):
            while standin.request_counts["create"] < 2:  # arrived, queued behind the first
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)

        standin.restart()

        for request in (in_flight, queued):
            with pytest.raises(aiohttp.ClientConnectionError):
                await request
        await asyncio.sleep(2 * DELAY)
        assert standin.all_hospitals() == []  # the restarted directory never got either


async def test_restart_drops_a_hanging_request(
    http: aiohttp.ClientSession, standin: StandIn, batch: str
) -> None:
    standin.add_fault("create", "hang", nth=1)
    hanging = asyncio.create_task(create(http, hospital(batch, "Hanging")))
    async with asyncio.timeout(10):
        while standin.request_counts["create"] < 1:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)

    standin.restart()

    with pytest.raises(aiohttp.ClientConnectionError):
        await asyncio.wait_for(hanging, 2)  # reset with the process, not left hanging


async def test_duplicates_are_empty_when_every_row_was_created_once(
    http: aiohttp.ClientSession, standin: StandIn, batch: str
) -> None:
    standin.set_delay(0.0)
    await create(http, hospital(batch, "A"))
    await create(http, hospital(batch, "B"))
    await create(http, hospital(str(uuid4()), "A"))
    assert standin.duplicates() == []

    await create(http, hospital(batch, "A"))

    assert [(d["name"], d["count"]) for d in standin.duplicates()] == [("A", 2)]
