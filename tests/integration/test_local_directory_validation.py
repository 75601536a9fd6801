"""The stand-in refuses bad requests with FastAPI's 422 bodies, before any delay or limit."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from service.local_directory import DirectoryOptions, RunningDirectory, run_directory

BATCH = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
BAD_CHARACTER = (
    "invalid character: expected an optional prefix of `urn:uuid:` followed by [0-9a-fA-F-], "
    "found `n` at 1"
)


@pytest.fixture
async def directory() -> AsyncIterator[RunningDirectory]:
    # A long create delay: a 422 that slipped through to the sleep would time the test out.
    async with run_directory(DirectoryOptions(create_delay=30.0)) as running:
        yield running


@pytest.fixture
async def http(directory: RunningDirectory) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(directory.url, timeout=timeout) as session:
        yield session


def error(kind: str, loc: list[Any], msg: str, value: Any, **ctx: Any) -> dict[str, Any]:
    item = {"type": kind, "loc": loc, "msg": msg, "input": value}
    return {**item, "ctx": ctx} if ctx else item


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            {"address": "x"},
            error("missing", ["body", "name"], "Field required", {"address": "x"}),
            id="missing field",
        ),
        pytest.param(
            {"name": "", "address": "x"},
            error(
                "string_too_short",
                ["body", "name"],
                "String should have at least 1 character",
                "",
                min_length=1,
            ),
            id="empty string",
        ),
        pytest.param(
            {"name": "x", "address": " \t "},
            error(
                "value_error",
                ["body", "address"],
                "Value error, Field cannot be empty or whitespace only",
                " \t ",
                error={},
            ),
            id="whitespace only",
        ),
        pytest.param(
            {"name": None, "address": "x"},
            error("string_type", ["body", "name"], "Input should be a valid string", None),
            id="null",
        ),
        pytest.param(
            {"name": "x", "address": 12},
            error("string_type", ["body", "address"], "Input should be a valid string", 12),
            id="number",
        ),
        pytest.param(
            {"name": "x", "address": "x", "phone": 5551234},
            error("string_type", ["body", "phone"], "Input should be a valid string", 5551234),
            id="numeric phone",
        ),
        pytest.param(
            {"name": "x", "address": "x", "creation_batch_id": "not-a-uuid"},
            error(
                "uuid_parsing",
                ["body", "creation_batch_id"],
                f"Input should be a valid UUID, {BAD_CHARACTER}",
                "not-a-uuid",
                error=BAD_CHARACTER,
            ),
            id="malformed uuid",
        ),
        pytest.param(
            {"name": "x", "address": "x", "creation_batch_id": 7},
            error(
                "uuid_type",
                ["body", "creation_batch_id"],
                "UUID input should be a string, bytes or UUID object",
                7,
            ),
            id="numeric uuid",
        ),
        pytest.param(
            ["x"],
            error(
                "model_attributes_type",
                ["body"],
                "Input should be a valid dictionary or object to extract fields from",
                ["x"],
            ),
            id="non-object body",
        ),
    ],
)
async def test_create_body_errors(
    http: aiohttp.ClientSession, body: Any, expected: dict[str, Any]
) -> None:
    async with http.post("/hospitals/", json=body) as response:
        assert response.status == 422
        assert await response.json() == {"detail": [expected]}


async def test_every_field_error_is_reported_in_order(http: aiohttp.ClientSession) -> None:
    body = {"name": "", "phone": 1, "creation_batch_id": "1234"}

    async with http.post("/hospitals/", json=body) as response:
        detail = (await response.json())["detail"]

    assert [(e["type"], e["loc"][1]) for e in detail] == [
        ("string_too_short", "name"),
        ("missing", "address"),
        ("string_type", "phone"),
        ("uuid_parsing", "creation_batch_id"),
    ]
    assert detail[3]["ctx"] == {
        "error": "invalid length: expected length 32 for simple format, found 4"
    }


async def test_malformed_json(http: aiohttp.ClientSession) -> None:
    headers = {"Content-Type": "application/json"}

    async with http.post("/hospitals/", data=b'{"name": ', headers=headers) as response:
        assert response.status == 422
        assert await response.json() == {
            "detail": [
                error("json_invalid", ["body", 9], "JSON decode error", {}, error="Expecting value")
            ]
        }


@pytest.mark.parametrize("body", [b"", b"null"], ids=["empty", "JSON null"])
async def test_empty_body(http: aiohttp.ClientSession, body: bytes) -> None:
    # FastAPI reads a `null` body as no body at all: "missing", not a type error.
    headers = {"Content-Type": "application/json"}
    async with http.post("/hospitals/", data=body, headers=headers) as response:
        assert response.status == 422
        assert await response.json() == {
            "detail": [error("missing", ["body"], "Field required", None)]
        }


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        (
            "GET",
            "/hospitals/abc",
            error(
                "int_parsing",
                ["path", "hospital_id"],
                "Input should be a valid integer, unable to parse string as an integer",
                "abc",
            ),
        ),
        (
            "DELETE",
            "/hospitals/batch",
            error(
                "int_parsing",
                ["path", "hospital_id"],
                "Input should be a valid integer, unable to parse string as an integer",
                "batch",
            ),
        ),
        (  # a full-width 5: a digit to Python's int(), not to pydantic's
            "GET",
            "/hospitals/\uff15",
            error(
                "int_parsing",
                ["path", "hospital_id"],
                "Input should be a valid integer, unable to parse string as an integer",
                "\uff15",
            ),
        ),
        (  # past int()'s 4,300 digits: its ValueError was a 500
            "GET",
            "/hospitals/" + "1" * 4301,
            error(
                "int_parsing_size",
                ["path", "hospital_id"],
                "Unable to parse input string as an integer, exceeded maximum size",
                "1" * 4301,
            ),
        ),
        *(
            (
                method,
                path,
                error(
                    "uuid_parsing",
                    ["path", "batch_id"],
                    f"Input should be a valid UUID, {BAD_CHARACTER}",
                    "not-a-uuid",
                    error=BAD_CHARACTER,
                ),
            )
            for method, path in [
                ("GET", "/hospitals/batch/not-a-uuid"),
                ("DELETE", "/hospitals/batch/not-a-uuid"),
                ("PATCH", "/hospitals/batch/not-a-uuid/activate"),
            ]
        ),
    ],
)
async def test_path_parameter_errors(
    http: aiohttp.ClientSession, method: str, path: str, expected: dict[str, Any]
) -> None:
    async with http.request(method, path) as response:
        assert response.status == 422
        assert await response.json() == {"detail": [expected]}


async def test_put_reports_path_then_body_errors(http: aiohttp.ClientSession) -> None:
    async with http.put("/hospitals/x", json={"name": None}) as response:
        detail = (await response.json())["detail"]

    assert response.status == 422
    assert [(e["type"], e["loc"]) for e in detail] == [
        ("int_parsing", ["path", "hospital_id"]),
        ("string_type", ["body", "name"]),
    ]


async def test_refused_creates_store_nothing_and_are_not_rate_limited(
    http: aiohttp.ClientSession, directory: RunningDirectory
) -> None:
    for _ in range(35):
        async with http.post("/hospitals/", json={"name": "x"}) as response:
            assert response.status == 422

    assert directory.standin.all_hospitals() == []
    assert directory.standin.request_counts["create"] == 35
