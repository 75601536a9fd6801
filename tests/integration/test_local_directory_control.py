"""The HTTP control surface and the command line, which both say they are the stand-in."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from service.local_directory import DirectoryOptions, RunningDirectory, run_directory

RUN_CLI = "import sys; from service.local_directory.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
async def directory() -> AsyncIterator[RunningDirectory]:
    async with run_directory(DirectoryOptions(create_delay=0.0, control=True)) as running:
        yield running


@pytest.fixture
async def http(directory: RunningDirectory) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(directory.url) as session:
        yield session


async def control(
    http: aiohttp.ClientSession, method: str, action: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, f"/_standin/{action}", json=body) as response:
        return response.status, await response.json()


async def create(http: aiohttp.ClientSession, body: dict[str, Any]) -> int:
    async with http.post("/hospitals/", json=body) as response:
        return response.status


async def test_state_reports_counts_batches_and_duplicates(http: aiohttp.ClientSession) -> None:
    batch = str(uuid4())
    row = {"name": "Twin", "address": "x", "creation_batch_id": batch}
    assert [await create(http, row) for _ in range(2)] == [200, 200]
    assert await create(http, {"name": "no address"}) == 422

    status, state = await control(http, "GET", "state")

    assert status == 200
    assert state["standin"] is True
    assert state["request_counts"] == {"create": 3}
    assert state["hospital_count"] == 2
    assert state["batches"] == {batch: 2}
    assert state["duplicates"] == [
        {"creation_batch_id": batch, "name": "Twin", "address": "x", "phone": None, "count": 2}
    ]


async def test_delay_can_be_changed(http: aiohttp.ClientSession) -> None:
    assert await control(http, "POST", "delay", {"create_delay": 0.3, "jitter": 0.1}) == (
        200,
        {"standin": True, "create_delay": 0.3, "jitter": 0.1},
    )
    started = time.monotonic()

    assert await create(http, {"name": "Slow", "address": "x"}) == 200
    # 0.3 s and up to 0.1 s of jitter; the room above is for a loaded machine's round trip.
    assert 0.3 <= time.monotonic() - started < 0.8


@pytest.mark.parametrize(
    "body",
    [
        '{"create_delay": NaN}',
        '{"create_delay": Infinity}',
        '{"create_delay": 0, "jitter": NaN}',
        '{"create_delay": 1' + "0" * 400 + "}",  # an integer no float holds
    ],
)
async def test_delays_that_are_no_number_of_seconds_are_refused(
    http: aiohttp.ClientSession, body: str
) -> None:
    # Python's JSON reads NaN and Infinity; a NaN delay would hold every create forever.
    async with http.post("/_standin/delay", data=body) as response:
        assert response.status == 400
        assert (await response.json())["standin"] is True
    async with http.get("/_standin/state") as response:
        assert (await response.json())["create_delay"] == 0.0


async def test_faults_can_be_added_and_cleared(
    http: aiohttp.ClientSession, directory: RunningDirectory
) -> None:
    batch = str(uuid4())
    rule = {"endpoint": "create", "kind": "commit_drop", "nth": [1]}
    status, answer = await control(http, "POST", "faults", rule)
    assert (status, answer["standin"], answer["fault"]["kind"]) == (200, True, "commit_drop")

    with pytest.raises(aiohttp.ClientConnectionError):
        await create(http, {"name": "Dropped", "address": "x", "creation_batch_id": batch})
    assert len(directory.standin.hospitals_in_batch(batch)) == 1

    await control(http, "POST", "faults", {"endpoint": "root", "kind": "500"})
    assert await control(http, "DELETE", "faults") == (200, {"standin": True})
    async with http.get("/") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    "rule",
    [
        {"endpoint": "nowhere", "kind": "500"},
        {"endpoint": "create", "kind": "teapot"},
        {"endpoint": "create", "kind": "500", "probability": 0.5, "nth": [1]},
        {"endpoint": "create", "kind": "500", "nth": [0]},
        {"endpoint": "create", "kind": "500", "nth": []},  # struck every request before
    ],
)
async def test_bad_fault_rules_are_refused(http: aiohttp.ClientSession, rule: Any) -> None:
    status, answer = await control(http, "POST", "faults", rule)

    assert status == 400
    assert answer["standin"] is True
    assert answer["error"]


async def test_cold_start_delays_the_next_request(http: aiohttp.ClientSession) -> None:
    assert await control(http, "POST", "cold-start", {"seconds": 0.3}) == (
        200,
        {"standin": True, "cold_start": 0.3},
    )
    started = time.monotonic()

    async with http.get("/") as response:
        assert response.status == 200
    assert time.monotonic() - started >= 0.3


async def test_restart_wipes_the_directory(http: aiohttp.ClientSession) -> None:
    assert await create(http, {"name": "Old", "address": "x"}) == 200

    assert await control(http, "POST", "restart") == (200, {"standin": True})

    async with http.get("/hospitals/1") as response:
        assert response.status == 404


async def test_control_requests_are_not_directory_traffic(
    http: aiohttp.ClientSession, directory: RunningDirectory
) -> None:
    directory.standin.cold_start(5.0)
    started = time.monotonic()

    for _ in range(60):
        assert (await control(http, "GET", "state"))[0] == 200

    assert time.monotonic() - started < 2.0
    assert directory.standin.request_counts == {}


async def test_the_command_line_serves_and_announces_a_stand_in() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN_CLI, "--port", "0", "--control", stderr=asyncio.subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), timeout=10)).decode()
        assert "Local Hospital Directory stand-in (NOT the real directory)" in line
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match is not None

        async with aiohttp.ClientSession(match.group(1)) as http:
            async with http.get("/") as response:
                assert await response.json() == {"status": "OK"}
            assert (await control(http, "GET", "state"))[1]["standin"] is True

        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_command_line_fails_loudly_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RUN_CLI, "--port", port, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=10)

    assert process.returncode == 1
    assert b"could not start" in stderr
