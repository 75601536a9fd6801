"""Rate limits in fixed windows, the shared handler pool and cold starts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from service.local_directory import DirectoryOptions, RunningDirectory, run_directory
from tests.support import creates_entered

WINDOW = 1.0
UNLIMITED = DirectoryOptions(create_delay=1.0, rate_limit=False)


@asynccontextmanager
async def serving(
    options: DirectoryOptions,
) -> AsyncIterator[tuple[RunningDirectory, aiohttp.ClientSession]]:
    async with run_directory(options) as directory, aiohttp.ClientSession(directory.url) as http:
        yield directory, http


async def call(http: aiohttp.ClientSession, method: str, path: str) -> tuple[int, Any]:
    async with http.request(method, path) as response:
        return response.status, await response.json()


async def create(http: aiohttp.ClientSession, body: dict[str, Any] | None = None) -> int:
    async with http.post("/hospitals/", json=body or {"name": "H", "address": "x"}) as response:
        return response.status


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def test_creates_are_limited_to_30_per_window_without_retry_after() -> None:
    async with serving(DirectoryOptions(create_delay=0.0, window_seconds=WINDOW)) as (_, http):
        assert await asyncio.gather(*(create(http) for _ in range(30))) == [200] * 30
        answered = time.monotonic()  # the window opened with the first of them, before this
        async with http.post("/hospitals/", json={"name": "H", "address": "x"}) as response:
            assert response.status == 429
            assert await response.json() == {"error": "Rate limit exceeded: 30 per 1 minute"}
            assert "Retry-After" not in response.headers

        await sleep_until(answered + WINDOW + 0.1)
        assert await create(http) == 200


async def test_the_window_is_fixed_from_its_first_request() -> None:
    async with serving(DirectoryOptions(window_seconds=WINDOW)) as (_, http):
        opened = time.monotonic()
        early = [call(http, "GET", "/hospitals/") for _ in range(25)]
        assert {status for status, _ in await asyncio.gather(*early)} == {200}
        answered = time.monotonic()  # the window opened with the first of them, before this
        await sleep_until(opened + WINDOW / 2)
        late = [call(http, "GET", "/hospitals/") for _ in range(25)]
        assert {status for status, _ in await asyncio.gather(*late)} == {200}
        assert await call(http, "GET", "/hospitals/") == (
            429,
            {"error": "Rate limit exceeded: 50 per 1 minute"},
        )

        await sleep_until(answered + WINDOW + 0.1)
        # A sliding window would still hold the 25 late calls and let only 25 through.
        again = [call(http, "GET", "/hospitals/") for _ in range(50)]
        assert {status for status, _ in await asyncio.gather(*again)} == {200}


async def test_each_endpoint_has_its_own_limit() -> None:
    async with serving(DirectoryOptions()) as (_, http):
        roots = await asyncio.gather(*(call(http, "GET", "/") for _ in range(100)))
        assert {status for status, _ in roots} == {200}

        assert await call(http, "GET", "/") == (
            429,
            {"error": "Rate limit exceeded: 100 per 1 minute"},
        )
        assert (await call(http, "GET", "/hospitals/"))[0] == 200
        assert await call(http, "GET", "/hospitals/1") == (404, {"detail": "Hospital not found"})

        # Two endpoints of 50 a minute each: spending one leaves the other whole.
        lists = await asyncio.gather(*(call(http, "GET", "/hospitals/") for _ in range(49)))
        assert {status for status, _ in lists} == {200}
        assert (await call(http, "GET", "/hospitals/"))[0] == 429
        gets = await asyncio.gather(*(call(http, "GET", "/hospitals/1") for _ in range(49)))
        assert {status for status, _ in gets} == {404}


async def test_each_caller_has_its_own_limit() -> None:
    async with serving(DirectoryOptions(create_delay=0.0)) as (directory, http):
        assert await asyncio.gather(*(create(http) for _ in range(30))) == [200] * 30
        assert await create(http) == 429
        # Another address on the loopback network is another caller, with a window of its own.
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(directory.url, connector=other) as elsewhere:
            assert await create(elsewhere) == 200


async def test_a_full_batch_is_refused_before_the_create_delay() -> None:
    async with serving(DirectoryOptions(create_delay=2.0, rate_limit=False)) as (_, http):
        body = {"name": "H", "address": "x", "creation_batch_id": str(uuid4())}
        assert await asyncio.gather(*(create(http, body) for _ in range(20))) == [200] * 20

        started = time.monotonic()
        assert await create(http, body) == 400
        assert time.monotonic() - started < 1.0  # checked first, before the 2 s sleep


async def test_full_batch_refusals_count_towards_the_create_limit() -> None:
    async with serving(DirectoryOptions(create_delay=0.0)) as (_, http):
        body = {"name": "H", "address": "x", "creation_batch_id": str(uuid4())}

        assert await asyncio.gather(*(create(http, body) for _ in range(20))) == [200] * 20
        assert [await create(http, body) for _ in range(10)] == [400] * 10
        assert await create(http, body) == 429


async def test_no_rate_limit_lets_everything_through() -> None:
    async with serving(DirectoryOptions(create_delay=0.0, rate_limit=False)) as (_, http):
        assert await asyncio.gather(*(create(http) for _ in range(40))) == [200] * 40


async def test_creates_beyond_the_handler_pool_arrive_in_a_second_wave() -> None:
    async with serving(UNLIMITED) as (directory, http):
        started = time.monotonic()

        async def finished_after() -> float:
            assert await create(http) == 200
            return time.monotonic() - started

        *first_wave, last = sorted(await asyncio.gather(*(finished_after() for _ in range(41))))

    # Measured from the first answer, not from the start: sending 41 requests is quick on an
    # idle machine only. One of the 40 waiting for a slot would end a whole delay after it.
    delay = UNLIMITED.create_delay
    assert max(first_wave) - min(first_wave) < delay
    assert last - min(first_wave) >= delay / 2  # it got a slot only once one was given back
    assert len(directory.standin.all_hospitals()) == 41


async def test_the_handler_pool_is_shared_by_all_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(DirectoryOptions(create_delay=0.3, rate_limit=False, handlers=1)) as (
        directory,
        http,
    ):
        entered = creates_entered(directory, monkeypatch)
        slow = asyncio.create_task(create(http))
        await asyncio.wait_for(entered.wait(), 10)  # the create holds the one handler

        assert await call(http, "GET", "/") == (200, {"status": "OK"})
        assert len(directory.standin.all_hospitals()) == 1  # answered after the create's end
        assert await slow == 200


async def test_validation_answers_without_waiting_for_a_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(DirectoryOptions(create_delay=2.0, rate_limit=False, handlers=1)) as (
        directory,
        http,
    ):
        entered = creates_entered(directory, monkeypatch)
        slow = asyncio.create_task(create(http))
        await asyncio.wait_for(entered.wait(), 10)  # the create holds the one handler

        assert await create(http, {"name": "no address"}) == 422
        assert directory.standin.all_hospitals() == []  # answered while the create sleeps
        assert await slow == 200


async def test_a_cold_start_holds_every_request_until_the_directory_is_up() -> None:
    async with serving(DirectoryOptions()) as (directory, http):
        directory.standin.cold_start(1.0)
        started = time.monotonic()

        async def answered_after(wait: float) -> float:
            await asyncio.sleep(wait)
            assert (await call(http, "GET", "/"))[0] == 200
            return time.monotonic() - started

        first, second = await asyncio.gather(answered_after(0.0), answered_after(0.5))

        # Up at 1 s for both; a second cold start for the second would end at 1.5 s.
        assert 1.0 <= first < 1.25
        assert 1.0 <= second < 1.25
        third = await answered_after(0.0)
        assert third - second < 0.5  # awake now: not held another second
