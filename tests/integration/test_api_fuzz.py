"""API fuzzing: every operation of /openapi.json gets what the document allows and what it
forbids; no answer may be a 5xx or differ from what the document says.

Left out: the websocket handshakes, GET /batch/{batch_id}/ws and GET /ws. Schemathesis speaks
request and response, so it can never open a socket, and what a socket carries is described in
docs/websocket.md, not in the OpenAPI document; test_websocket.py covers them.

The document is loaded from `create_app` when this module is imported, because schemathesis'
fixture loader (`schemathesis.pytest.from_fixture`) does not run on pytest 9.2; the first test
proves that it is the document the live service serves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import csv
import io
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, HookContext

from service.app import create_app
from service.local_directory import DirectoryOptions, run_directory
from service.settings import Settings
from service.store.migrations import migrate
from service.web.intake import MAX_KEY_LENGTH
from tests.support import SAMPLE_CSV, Service, fast_settings, running_service

LONG = os.environ.get("CHAOS") == "long"
# Generated requests per operation, on top of the boundary cases schemathesis always sends.
EXAMPLES = 500 if LONG else 15
CSV_EXAMPLES = 200 if LONG else 10
# The quick run sends the same requests every time; the long run draws new ones each time.
SEED = None if LONG else 20240611
# Batches that exist before fuzzing starts, so that generated ids find something: one
# completed, one rolled back. Their ids follow from their Idempotency-Keys.
COMPLETED_KEY, ROLLED_BACK_KEY = "fuzz-completed", "fuzz-rolled-back"
# The fuzzed service's database gets this namespace for them, so their ids are known here.
NAMESPACE = uuid.UUID("6f1c7f0e-2b9a-4c43-9f57-6d1f1a0c9b11")
KNOWN = [str(uuid.uuid5(NAMESPACE, k)) for k in (COMPLETED_KEY, ROLLED_BACK_KEY)]
UPLOADS = ["/batch/upload-csv", "/batch/validate-csv", "/hospitals/bulk"]
# Schema-valid requests the service still refuses, for rules Swagger 2.0 cannot state: the file
# must be a CSV, a cursor must come from this API, as_of a version the batch has reached.
REFUSED_BEYOND_THE_SCHEMA = [
    (r"^/(batch/(upload|validate)-csv|hospitals/bulk)$", ["413", "422"]),
    (r"^/batch$", ["422"]),
    (r"^/batch/\{batch_id\}/status$", ["422"]),
]
# aiohttp's HTTP parser answers a request line or header longer than this itself, with a
# text/plain 400, before the service sees the request: nothing the service documents or does
# can change that answer, so such requests are not generated.
HTTP_LINE_LIMIT = 8190
LINE_OVERHEAD = 512  # method, path, protocol, header name


def _config() -> schemathesis.Config:
    accepted = ["2xx", "404", "409"]
    return schemathesis.Config.from_dict(
        {
            **({} if SEED is None else {"seed": SEED}),
            "generation": {"max-examples": EXAMPLES, "deterministic": not LONG, "database": "none"},
            "operations": [
                {
                    "include-path-regex": path,
                    "checks": {"positive_data_acceptance": {"expected-statuses": accepted + more}},
                }
                for path, more in REFUSED_BEYOND_THE_SCHEMA
            ],
        }
    )


DOCUMENT = create_app(Settings())["swagger_dict"]
documented = schemathesis.openapi.from_dict(DOCUMENT, config=_config())
schema = documented.exclude(path_regex=r"/ws$")


@schema.hook
def map_path_parameters(context: HookContext, path_parameters: Any) -> Any:
    """Point most well-formed batch ids at a batch that exists; the rest stay unknown (404)."""
    if not isinstance(path_parameters, dict):
        return path_parameters
    try:
        drawn = uuid.UUID(str(path_parameters.get("batch_id")))
    except ValueError:
        return path_parameters
    choice = drawn.int % (len(KNOWN) + 1)
    if choice < len(KNOWN):
        return {**path_parameters, "batch_id": KNOWN[choice]}
    return path_parameters


def _fits_a_line(values: Any) -> bool:
    if not isinstance(values, dict):
        return True
    return len(urlencode(values, doseq=True)) <= HTTP_LINE_LIMIT - LINE_OVERHEAD


@schema.hook
def filter_query(context: HookContext, query: Any) -> bool:
    """Only queries aiohttp's HTTP parser hands on to the service."""
    return _fits_a_line(query)


@schema.hook
def filter_headers(context: HookContext, headers: Any) -> bool:
    """Only headers aiohttp's HTTP parser hands on to the service."""
    return _fits_a_line(headers)


class ServiceThread:
    """The stand-in and the real service on an event loop of their own, for sync callers."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()
        self.url: concurrent.futures.Future[str] = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, name="fuzzed-service")

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        try:
            options = DirectoryOptions(create_delay=0.01, rate_limit=False)
            async with contextlib.AsyncExitStack() as stack:
                directory = await stack.enter_async_context(run_directory(options))
                settings = fast_settings(self.db, directory.url)
                service = await stack.enter_async_context(running_service(settings))
                await seed_known_batches(service)
                self.url.set_result(service.url)
                await self.stopping.wait()
        except BaseException as exc:
            if not self.url.done():
                self.url.set_exception(exc)
            raise

    def __enter__(self) -> str:
        self.thread.start()
        try:
            return self.url.result(timeout=60)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the service did not stop"


async def seed_known_batches(service: Service) -> None:
    """Create the KNOWN batches: one completed, one rolled back."""
    for key, batch_id in zip((COMPLETED_KEY, ROLLED_BACK_KEY), KNOWN, strict=True):
        accepted = await service.upload(SAMPLE_CSV, headers={"Idempotency-Key": key})
        assert accepted["batch_id"] == batch_id
        await service.wait_finished(batch_id)
    async with service.http.delete(f"{service.url}/batch/{KNOWN[1]}") as r:
        assert r.status in (200, 202), await r.text()
    while not (await service.get(f"/batch/{KNOWN[1]}/status"))[1]["rolled_back"]:
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db = tmp_path_factory.mktemp("fuzz") / "service.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        migrate(conn)
        conn.execute("UPDATE instance SET idempotency_namespace = ?", (NAMESPACE.hex,))
    with ServiceThread(db) as url:
        yield url


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def test_the_fuzzed_document_is_the_live_one(live_url: str, http: requests.Session) -> None:
    assert http.get(f"{live_url}/openapi.json").json() == DOCUMENT


@schema.parametrize()
def test_every_operation_answers_as_documented(
    case: Case[Any], live_url: str, http: requests.Session
) -> None:
    case.call_and_validate(base_url=live_url, session=http)


# Schemathesis cannot name a generated file *.csv, so its uploads never get past the file name
# check; these are CSV files, valid and not, sent as `curl -F file=@hospitals.csv` would.

# Mostly words and punctuation (commas and quotes included), sometimes any text at all.
WORDS = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), min_size=1)
CELL = st.one_of(WORDS, WORDS, WORDS, st.text(st.characters(codec="utf-8")))
HEADERS = [
    ["name", "address", "phone"],
    ["Phone", "NAME", "Address"],
    ["name", "address"],
    ["name", "phone"],
    ["name", "address", "phone", "email"],
]


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    """A CSV: a header, valid or not, then rows of mostly the header's width, maybe a BOM."""
    header = draw(st.sampled_from(HEADERS))
    widths = st.sampled_from([len(header)] * 4 + [len(header) - 1, len(header) + 1])
    row = widths.flatmap(lambda n: st.lists(CELL, min_size=n, max_size=n))
    rows = draw(st.lists(row, max_size=6))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerows([header, *rows])
    bom = draw(st.sampled_from(["", "\ufeff"]))
    return (bom + out.getvalue()).encode()


@pytest.mark.parametrize("path", UPLOADS)
def test_csv_uploads_are_answered_as_documented(
    path: str, live_url: str, http: requests.Session
) -> None:
    operation = schema[path]["POST"]

    # A few keys, so that some uploads repeat one with the same file and some with another.
    @hypothesis.settings(
        max_examples=CSV_EXAMPLES, derandomize=not LONG, database=None, deadline=None
    )
    @hypothesis.given(content=csv_files(), key=st.sampled_from([None, "fuzz-a", "fuzz-b"]))
    def upload(content: bytes, key: str | None) -> None:
        response = http.post(
            f"{live_url}{path}",
            files={"file": ("hospitals.csv", content, "text/csv")},
            headers={} if key is None else {"Idempotency-Key": key},
        )
        operation.Case(media_type="multipart/form-data").validate_response(response)

    upload()


# Regressions: each case the fuzzing found, as it was sent, with the answer it must now get.

UNKNOWN = "00000000-0000-4000-8000-000000000000"
BEYOND_SQLITE = 2**63  # one past the largest SQLite integer: binding it used to answer 500


@pytest.mark.parametrize(
    ("method", "path", "batch_id", "query", "status"),
    [
        pytest.param("GET", "/health", None, {}, 200, id="health-uptime-undocumented"),
        pytest.param("GET", "/events", None, {"after": BEYOND_SQLITE}, 422, id="events-after-500"),
        pytest.param(
            "GET",
            "/batch/{batch_id}/events",
            KNOWN[0],
            {"after": BEYOND_SQLITE},
            422,
            id="batch-events-after-500",
        ),
        pytest.param(
            "GET",
            "/batch/{batch_id}/status",
            KNOWN[0],
            {"as_of": BEYOND_SQLITE - 1},
            422,
            id="status-as-of-500",
        ),
        pytest.param("GET", "/events", None, {"limit": 1001}, 422, id="events-422-undocumented"),
        pytest.param(
            "GET",
            "/batch/{batch_id}/results.csv",
            UNKNOWN,
            {},
            404,
            id="results-json-error-undocumented",
        ),
        pytest.param("GET", "/ws", None, {"after": -1}, 422, id="ws-after-422-undocumented"),
        pytest.param(
            "GET", "/batch/{batch_id}/progress", "0", {}, 422, id="batch-id-not-uuid-refused"
        ),
    ],
)
def test_found_by_fuzzing(
    method: str,
    path: str,
    batch_id: str | None,
    query: dict[str, int],
    status: int,
    live_url: str,
    http: requests.Session,
) -> None:
    path_parameters = {} if batch_id is None else {"batch_id": batch_id}
    case = documented[path][method].Case(path_parameters=path_parameters, query=query)
    response = case.call(base_url=live_url, session=http)
    assert response.status_code == status, response.text
    case.validate_response(response)


def test_batch_ids_are_documented_as_uuids() -> None:
    # Any string was documented, so "0" was a valid id that the service refused with 422.
    ids = [
        parameter
        for operations in DOCUMENT["paths"].values()
        for operation in operations.values()
        for parameter in operation["parameters"]
        if parameter["name"] == "batch_id"
    ]
    batch_operations = [
        operation
        for path, operations in DOCUMENT["paths"].items()
        if "{batch_id}" in path
        for operation in operations.values()
    ]
    assert len(ids) == len(batch_operations)
    assert all(p["format"] == "uuid" for p in ids), ids


def test_every_parameter_default_is_of_the_parameter_type() -> None:
    # `after` was documented as an integer with `default: null`: openapi-spec-validator refused
    # the document ("None for not nullable"), and so do the client generators that check it.
    types = {"integer": int, "string": str, "boolean": bool}
    defaults = [
        (path, parameter["name"], parameter["type"], parameter["default"])
        for path, operations in DOCUMENT["paths"].items()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if "default" in parameter
    ]
    assert defaults
    assert [d for d in defaults if type(d[3]) is not types[d[2]]] == []


@pytest.mark.parametrize("path", ["/batch/upload-csv", "/hospitals/bulk"])
def test_an_empty_idempotency_key_is_documented_as_refused(
    path: str, live_url: str, http: requests.Session
) -> None:
    response = http.post(
        f"{live_url}{path}",
        files={"file": ("hospitals.csv", SAMPLE_CSV, "text/csv")},
        headers={"Idempotency-Key": ""},
    )
    assert response.status_code == 422, response.text
    (key,) = [p for p in DOCUMENT["paths"][path]["post"]["parameters"] if p["in"] == "header"]
    assert (key["minLength"], key["maxLength"]) == (1, MAX_KEY_LENGTH)


@pytest.mark.parametrize("path", ["/batch/upload-csv", "/batch/validate-csv"])
@pytest.mark.parametrize("method", ["OPTIONS", "DELETE", "PUT"])
def test_fixed_batch_paths_allow_only_post(
    path: str, method: str, live_url: str, http: requests.Session
) -> None:
    # DELETE /batch/{batch_id} matched these paths too: Allow listed DELETE and a DELETE was
    # taken for the rollback of a batch called "upload-csv".
    response = http.request(method, f"{live_url}{path}")
    assert response.status_code == 405, response.text
    assert response.headers["Allow"] == "POST"
    assert response.json() == {"detail": "Method Not Allowed"}


# Headers HTTP itself gives every answer, or that aiohttp and the security middleware add to
# each one; any other header the service sends is part of its contract.
HTTP_OWN = {
    "content-type",
    "content-length",
    "date",
    "server",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "x-content-type-options",
}


def test_every_header_sent_beyond_http_is_documented(live_url: str, http: requests.Session) -> None:
    key = {"Idempotency-Key": f"headers-{uuid.uuid4()}"}
    file = {"file": ("hospitals.csv", SAMPLE_CSV, "text/csv")}
    answers = [
        ("post", "/batch/upload-csv", http.post(f"{live_url}/batch/upload-csv", files=file)),
    ]
    for path in ("/batch/upload-csv", "/hospitals/bulk"):
        for _ in range(2):  # new, then the same key and file again
            answer = http.post(f"{live_url}{path}", files=file, headers=key)
            answers.append(("post", path, answer))
        key = {"Idempotency-Key": f"headers-{uuid.uuid4()}"}
    batch = answers[0][2].json()["batch_id"]
    for path in ("status", "progress", "results.csv", "events"):
        answer = http.get(f"{live_url}/batch/{batch}/{path}")
        answers.append(("get", f"/batch/{{batch_id}}/{path}", answer))
    answers.append(
        ("get", "/batch/{batch_id}/status", http.get(f"{live_url}/batch/{uuid.uuid4()}/status"))
    )

    seen = set()
    for method, path, answer in answers:
        status = str(answer.status_code)
        seen.add((path, status))
        documented = DOCUMENT["paths"][path][method]["responses"][status].get("headers", {})
        sent = {name for name in answer.headers if name.lower() not in HTTP_OWN}
        assert sent <= set(documented), (method, path, status, sent - set(documented))
        assert {"X-Request-ID"} <= sent
    # The replayed upload, the finished bulk upload and the export were among them.
    assert {("/batch/upload-csv", "200"), ("/hospitals/bulk", "200")} <= seen
    assert ("/batch/{batch_id}/results.csv", "200") in seen


def test_every_field_of_a_status_body_is_documented_as_required(
    live_url: str, http: requests.Session
) -> None:
    upload = http.post(
        f"{live_url}/batch/upload-csv", files={"file": ("hospitals.csv", SAMPLE_CSV, "text/csv")}
    )
    body = http.get(f"{live_url}/batch/{upload.json()['batch_id']}/status").json()
    assert set(DOCUMENT["definitions"]["Status"]["required"]) == set(body)
