"""The stand-in answers every row of UPSTREAM.md's endpoint table as the directory does."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import aiohttp
import pytest

from service.local_directory import DirectoryOptions, RunningDirectory, run_directory

BATCH_NOT_FOUND = {"detail": "No hospitals found with the specified batch ID"}
HOSPITAL_NOT_FOUND = {"detail": "Hospital not found"}


@pytest.fixture
async def directory() -> AsyncIterator[RunningDirectory]:
    async with run_directory(DirectoryOptions(create_delay=0.0)) as running:
        yield running


@pytest.fixture
async def http(directory: RunningDirectory) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(directory.url) as session:
        yield session


async def create(http: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    async with http.post("/hospitals/", json={"address": "1 Main St", **body}) as response:
        assert response.status == 200, await response.text()
        hospital: dict[str, Any] = await response.json()
        return hospital


async def answer(http: aiohttp.ClientSession, method: str, path: str) -> tuple[int, Any]:
    async with http.request(method, path, allow_redirects=False) as response:
        return response.status, await response.json()


async def answer_empty(http: aiohttp.ClientSession, method: str, path: str) -> int:
    async with http.request(method, path) as response:
        assert await response.read() == b""
        return response.status


async def test_root_answers_status_ok(http: aiohttp.ClientSession) -> None:
    assert await answer(http, "GET", "/") == (200, {"status": "OK"})


async def test_create_answers_200_with_the_hospital(http: aiohttp.ClientSession) -> None:
    batch = uuid4()

    plain = await create(http, name="General", phone="555-1234", unknown="ignored")
    member = await create(http, name="  Padded  ", creation_batch_id=str(batch).upper())

    assert plain == {
        "id": 1,
        "name": "General",
        "address": "1 Main St",
        "phone": "555-1234",
        "creation_batch_id": None,
        "active": True,
        "created_at": plain["created_at"],
    }
    assert member["id"] == 2
    assert member["name"] == "  Padded  "
    assert member["phone"] is None
    assert member["creation_batch_id"] == str(batch)
    assert member["active"] is False


async def test_names_and_addresses_have_no_maximum_length(http: aiohttp.ClientSession) -> None:
    long = "x" * 600_000  # a body of 1.2 MB, beyond aiohttp's default limit of 1 MiB
    body = json.dumps({"name": long, "address": long}).encode()

    headers = {"Content-Type": "application/json"}
    async with http.post("/hospitals/", data=io.BytesIO(body), headers=headers) as response:
        assert response.status == 200
        hospital = await response.json()

    assert (hospital["name"], hospital["address"]) == (long, long)


async def test_created_at_is_naive_utc_with_microseconds(http: aiohttp.ClientSession) -> None:
    created_at = (await create(http, name="Clock"))["created_at"]

    # pydantic leaves the fraction out only when it is exactly zero.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?", created_at)
    utc_now = datetime.now(UTC).replace(tzinfo=None)
    assert abs(datetime.fromisoformat(created_at) - utc_now) < timedelta(seconds=5)


async def test_phone_may_be_empty(http: aiohttp.ClientSession) -> None:
    assert (await create(http, name="Quiet", phone=""))["phone"] == ""


async def test_the_same_body_twice_makes_two_hospitals(
    http: aiohttp.ClientSession, directory: RunningDirectory
) -> None:
    batch = str(uuid4())

    first = await create(http, name="Twin", creation_batch_id=batch)
    second = await create(http, name="Twin", creation_batch_id=batch)

    assert first["id"] != second["id"]
    assert directory.standin.duplicates() == [
        {
            "creation_batch_id": batch,
            "name": "Twin",
            "address": "1 Main St",
            "phone": None,
            "count": 2,
        }
    ]


async def test_list_holds_every_hospital(http: aiohttp.ClientSession) -> None:
    created = [await create(http, name=name) for name in ("A", "B", "C")]

    assert await answer(http, "GET", "/hospitals/") == (200, created)


async def test_get_by_id(http: aiohttp.ClientSession) -> None:
    hospital = await create(http, name="Found")

    assert await answer(http, "GET", f"/hospitals/{hospital['id']}") == (200, hospital)
    assert await answer(http, "GET", "/hospitals/99") == (404, HOSPITAL_NOT_FOUND)


async def test_put_updates_only_the_fields_given(http: aiohttp.ClientSession) -> None:
    hospital = await create(http, name="Before", phone="1")

    async with http.put(f"/hospitals/{hospital['id']}", json={"phone": "2"}) as response:
        assert response.status == 200
        assert await response.json() == {**hospital, "phone": "2"}
    async with http.put("/hospitals/99", json={"name": "Nobody"}) as response:
        assert (response.status, await response.json()) == (404, HOSPITAL_NOT_FOUND)
    async with http.put(f"/hospitals/{hospital['id']}", json={"name": " "}) as response:
        assert response.status == 422
        assert (await response.json())["detail"][0]["type"] == "value_error"


async def test_delete_answers_204_then_404(http: aiohttp.ClientSession) -> None:
    hospital = await create(http, name="Gone")

    assert await answer_empty(http, "DELETE", f"/hospitals/{hospital['id']}") == 204
    assert await answer(http, "GET", f"/hospitals/{hospital['id']}") == (404, HOSPITAL_NOT_FOUND)
    assert await answer(http, "DELETE", f"/hospitals/{hospital['id']}") == (404, HOSPITAL_NOT_FOUND)


async def test_batch_get_lists_members_and_never_answers_empty(
    http: aiohttp.ClientSession,
) -> None:
    batch = str(uuid4())
    await create(http, name="Outsider")
    members = [await create(http, name=name, creation_batch_id=batch) for name in ("A", "B")]

    assert await answer(http, "GET", f"/hospitals/batch/{batch}") == (200, members)
    assert await answer(http, "GET", f"/hospitals/batch/{uuid4()}") == (404, BATCH_NOT_FOUND)
    for member in members:
        assert await answer_empty(http, "DELETE", f"/hospitals/{member['id']}") == 204
    assert await answer(http, "GET", f"/hospitals/batch/{batch}") == (404, BATCH_NOT_FOUND)


async def test_activation_succeeds_once_only(http: aiohttp.ClientSession) -> None:
    batch = str(uuid4())
    for name in ("A", "B"):
        await create(http, name=name, creation_batch_id=batch)
    path = f"/hospitals/batch/{batch}/activate"
    already_active = {
        "detail": "Cannot activate batch: one or more hospitals in the batch are already active"
    }

    assert await answer(http, "PATCH", path) == (
        200,
        {"activated_count": 2, "message": f"Activated 2 hospital(s) with batch ID {batch}"},
    )
    assert await answer(http, "PATCH", path) == (400, already_active)
    await create(http, name="Late", creation_batch_id=batch)
    assert await answer(http, "PATCH", path) == (400, already_active)
    assert await answer(http, "PATCH", f"/hospitals/batch/{uuid4()}/activate") == (
        404,
        BATCH_NOT_FOUND,
    )


async def test_batch_delete_removes_members(http: aiohttp.ClientSession) -> None:
    batch = str(uuid4())
    for name in ("A", "B", "C"):
        await create(http, name=name, creation_batch_id=batch)

    assert await answer(http, "DELETE", f"/hospitals/batch/{batch}") == (
        200,
        {"deleted_count": 3, "message": f"Deleted 3 hospital(s) with batch ID {batch}"},
    )
    assert await answer(http, "DELETE", f"/hospitals/batch/{batch}") == (404, BATCH_NOT_FOUND)


async def test_batch_of_20_refuses_a_21st_member(http: aiohttp.ClientSession) -> None:
    batch = str(uuid4())
    for number in range(20):
        await create(http, name=f"H{number}", creation_batch_id=batch)

    body = {"name": "One too many", "address": "x", "creation_batch_id": batch}
    async with http.post("/hospitals/", json=body) as response:
        assert response.status == 400
        assert await response.json() == {"detail": "Batch cannot exceed 20 hospitals"}


async def test_concurrent_creates_overshoot_the_batch_cap(
    http: aiohttp.ClientSession, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(0.2)
    batch = str(uuid4())

    hospitals = await asyncio.gather(
        *(create(http, name=f"H{n}", creation_batch_id=batch) for n in range(25))
    )

    assert len(hospitals) == 25
    assert len(directory.standin.hospitals_in_batch(batch)) == 25


@pytest.mark.parametrize(
    ("method", "path", "location"),
    [
        ("POST", "/hospitals", "/hospitals/"),
        ("GET", "/hospitals", "/hospitals/"),
        ("GET", "/hospitals/7/", "/hospitals/7"),
        ("GET", "/hospitals/batch/{batch}/", "/hospitals/batch/{batch}"),
        ("GET", "/hospitals/batch/{batch}//", "/hospitals/batch/{batch}"),  # rstrip, as Starlette
        ("DELETE", "/hospitals/batch/{batch}/", "/hospitals/batch/{batch}"),
        ("PATCH", "/hospitals/batch/{batch}/activate/", "/hospitals/batch/{batch}/activate"),
    ],
)
async def test_slash_twins_redirect_with_307(
    http: aiohttp.ClientSession, directory: RunningDirectory, method: str, path: str, location: str
) -> None:
    batch = uuid4()

    async with http.request(method, path.format(batch=batch), allow_redirects=False) as response:
        assert response.status == 307
        assert response.headers["Location"] == directory.url + location.format(batch=batch)


@pytest.mark.parametrize(
    ("method", "path"),
    [("PATCH", "/hospitals/1"), ("PUT", "/hospitals/"), ("HEAD", "/"), ("POST", "/")],
)
async def test_wrong_method_answers_405(
    http: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with http.request(method, path) as response:
        assert response.status == 405
        if method != "HEAD":
            assert await response.json() == {"detail": "Method Not Allowed"}


@pytest.mark.parametrize("path", ["/health", "/_standin/state", "/hospitals/1/activate"])
async def test_unknown_path_answers_404(http: aiohttp.ClientSession, path: str) -> None:
    assert await answer(http, "GET", path) == (404, {"detail": "Not Found"})


async def test_storage_drops_the_oldest_beyond_capacity() -> None:
    async with (
        run_directory(DirectoryOptions(create_delay=0.0, capacity=3)) as directory,
        aiohttp.ClientSession(directory.url) as http,
    ):
        for name in "ABCDE":
            await create(http, name=name)

        status, hospitals = await answer(http, "GET", "/hospitals/")
        assert status == 200
        assert [h["id"] for h in hospitals] == [3, 4, 5]
        assert await answer(http, "GET", "/hospitals/1") == (404, HOSPITAL_NOT_FOUND)


async def test_a_create_whose_client_left_still_commits(
    http: aiohttp.ClientSession, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(0.3)
    batch = str(uuid4())
    body = {"name": "Late", "address": "x", "creation_batch_id": batch}

    with pytest.raises(TimeoutError):
        await http.post("/hospitals/", json=body, timeout=aiohttp.ClientTimeout(total=0.1))
    assert directory.standin.hospitals_in_batch(batch) == []
    await asyncio.sleep(0.4)

    status, members = await answer(http, "GET", f"/hospitals/batch/{batch}")
    assert status == 200
    assert [m["name"] for m in members] == ["Late"]
