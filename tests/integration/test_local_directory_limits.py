"""Rate limits in fixed windows, the shared handler pool and cold starts."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import aiohttp

from service.local_directory import DirectoryOptions, RunningDirectory, run_directory

WINDOW = 1.0
UNLIMITED = DirectoryOptions(create_delay=0.3, rate_limit=False)


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

        assert len(first_wave) == 40
        assert max(first_wave) < 0.55
        assert last >= 0.55
        assert len(directory.standin.all_hospitals()) == 41


async def test_the_handler_pool_is_shared_by_all_endpoints() -> None:
    async with serving(DirectoryOptions(create_delay=0.3, rate_limit=False, handlers=1)) as (
        _,
        http,
    ):
        slow = asyncio.create_task(create(http))
        await asyncio.sleep(0.05)
        started = time.monotonic()

        assert await call(http, "GET", "/") == (200, {"status": "OK"})
        assert time.monotonic() - started >= 0.2
        assert await slow == 200


async def test_validation_answers_without_waiting_for_a_handler() -> None:
    async with serving(DirectoryOptions(create_delay=0.5, rate_limit=False, handlers=1)) as (
        _,
        http,
    ):
        slow = asyncio.create_task(create(http))
        await asyncio.sleep(0.05)
        started = time.monotonic()

        assert await create(http, {"name": "no address"}) == 422
        assert time.monotonic() - started < 0.3
        assert await slow == 200


async def test_a_cold_start_holds_every_request_until_the_directory_is_up() -> None:
    async with serving(DirectoryOptions()) as (directory, http):
        directory.standin.cold_start(0.5)
        started = time.monotonic()

        async def answered_after(wait: float) -> float:
            await asyncio.sleep(wait)
            assert (await call(http, "GET", "/"))[0] == 200
            return time.monotonic() - started

        first, second = await asyncio.gather(answered_after(0.0), answered_after(0.2))

        assert 0.5 <= first < 0.65
        assert 0.5 <= second < 0.65
        third = await answered_after(0.0)
        assert third - second < 0.1
