"""DirectoryClient against a mocked session, or the stand-in where connections count: what
each answer or failure proves."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from aioresponses import aioresponses
from yarl import URL

from service.local_directory import RunningDirectory
from service.processing import directory_client
from service.processing.directory_client import NO_SUCH_BATCH, Answer, DirectoryClient, Outcome
from service.settings import DirectorySettings
from tests.support import serving

BASE = "https://directory.test"
HOSPITALS = f"{BASE}/hospitals/"
BATCH_ID = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
BATCH = f"{BASE}/hospitals/batch/{BATCH_ID}"
HOSPITAL = {
    "id": 12,
    "name": "General Hospital",
    "address": "123 Main Street",
    "phone": "555-0100",
    "creation_batch_id": BATCH_ID,
    "active": False,
    "created_at": "2025-09-20T10:30:00.123456",
}
KEY = ConnectionKey("directory.test", 443, True, True, None, None, None)


class _Response(aiohttp.ClientResponse):
    """A response whose request was fully sent, as aiohttp 3.14 requires to be told."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class _Mocked(aioresponses):
    """aioresponses 0.7.9 builds responses without aiohttp 3.14's `stream_writer`
    (pnuckowski/aioresponses#289): build them with `_Response` instead."""

    def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _Response)
        super().add(url, method, *args, **kwargs)


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    with _Mocked() as m:
        yield m


@pytest.fixture
async def client() -> AsyncIterator[DirectoryClient]:
    # A trailing slash on the base URL must not double the one in the paths.
    settings = DirectorySettings(base_url=BASE + "/")
    async with DirectoryClient.new_session(settings) as session:
        yield DirectoryClient(session, settings)


async def create(client: DirectoryClient) -> Answer:
    return await client.create("General Hospital", "123 Main Street", "555-0100", BATCH_ID)


def only_call(mocked: aioresponses, method: str, url: str) -> Any:
    calls = mocked.requests[(method, URL(url))]
    assert len(calls) == 1
    return calls[0]


# Creating ---------------------------------------------------------------------------------


async def test_create_posts_the_batch_id_in_the_body_to_the_exact_path(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.post(HOSPITALS, payload=HOSPITAL)

    await create(client)

    assert list(mocked.requests) == [("POST", URL(HOSPITALS))]  # no query, trailing slash
    call = only_call(mocked, "POST", HOSPITALS)
    assert call.kwargs["json"] == {
        "name": "General Hospital",
        "address": "123 Main Street",
        "phone": "555-0100",
        "creation_batch_id": BATCH_ID,
    }
    assert call.kwargs.get("params") is None
    assert call.kwargs["allow_redirects"] is False


async def test_create_sends_a_missing_phone_as_null(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.post(HOSPITALS, payload=HOSPITAL)

    await client.create("General Hospital", "123 Main Street", None, BATCH_ID)

    assert only_call(mocked, "POST", HOSPITALS).kwargs["json"]["phone"] is None


async def test_create_uses_the_read_timeout_for_reads_and_no_total_limit(
    mocked: aioresponses,
) -> None:
    settings = DirectorySettings(base_url=BASE, read_timeout=31.0, connect_timeout=7.0)
    mocked.post(HOSPITALS, payload=HOSPITAL)
    async with aiohttp.ClientSession() as session:
        await DirectoryClient(session, settings).create("a", "b", None, BATCH_ID)

    timeout = only_call(mocked, "POST", HOSPITALS).kwargs["timeout"]
    assert (timeout.total, timeout.sock_read, timeout.sock_connect) == (None, 31.0, 7.0)


@pytest.mark.parametrize("status", [200, 201])
async def test_a_2xx_create_is_ok_with_the_hospital(
    mocked: aioresponses, client: DirectoryClient, status: int
) -> None:
    mocked.post(HOSPITALS, status=status, payload=HOSPITAL)

    answer = await create(client)

    assert answer.outcome is Outcome.OK
    assert answer.ok
    assert (answer.status, answer.body) == (status, HOSPITAL)


async def test_a_422_is_rejected_with_fastapi_details_flattened(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    detail = [
        {"type": "missing", "loc": ["body", "name"], "msg": "Field required", "input": {}},
        {
            "type": "string_too_short",
            "loc": ["body", "address"],
            "msg": "String should have at least 1 character",
            "input": "",
            "ctx": {"min_length": 1},
        },
    ]
    mocked.post(HOSPITALS, status=422, payload={"detail": detail})

    answer = await create(client)

    assert (answer.outcome, answer.status) == (Outcome.REJECTED, 422)
    assert answer.message == (
        "name: Field required; address: String should have at least 1 character"
    )


@pytest.mark.parametrize(
    ("loc", "said"),
    [(None, ": phone is bad"), (5, "5: phone is bad"), ("body", "body: phone is bad")],
)
async def test_a_refusal_whose_loc_is_not_a_list_is_rejected_in_its_words(
    mocked: aioresponses, client: DirectoryClient, loc: Any, said: str
) -> None:
    # A proxy's or another server's 4xx in FastAPI's shape, but not to the letter.
    mocked.post(HOSPITALS, status=422, payload={"detail": [{"loc": loc, "msg": "phone is bad"}]})

    answer = await create(client)

    assert (answer.outcome, answer.status, answer.message) == (Outcome.REJECTED, 422, said)


async def test_a_full_batch_is_rejected_with_the_directory_message(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.post(HOSPITALS, status=400, payload={"detail": "Batch cannot exceed 20 hospitals"})

    answer = await create(client)

    assert (answer.outcome, answer.status) == (Outcome.REJECTED, 400)
    assert answer.message == "Batch cannot exceed 20 hospitals"


async def test_a_429_is_rate_limited_with_the_error_message(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.post(HOSPITALS, status=429, payload={"error": "Rate limit exceeded: 30 per 1 minute"})

    answer = await create(client)

    assert (answer.outcome, answer.status) == (Outcome.RATE_LIMITED, 429)
    assert answer.message == "Rate limit exceeded: 30 per 1 minute"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_5xx_is_ambiguous(
    mocked: aioresponses, client: DirectoryClient, status: int
) -> None:
    mocked.post(HOSPITALS, status=status, payload={"detail": "Internal Server Error"})

    answer = await create(client)

    assert (answer.outcome, answer.status) == (Outcome.AMBIGUOUS, status)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(429, Outcome.RATE_LIMITED), (502, Outcome.AMBIGUOUS), (404, Outcome.NOT_FOUND)],
)
async def test_a_status_counts_even_when_its_body_is_not_json(
    mocked: aioresponses, client: DirectoryClient, status: int, outcome: Outcome
) -> None:
    # A proxy in front of the directory answers with HTML pages of its own.
    mocked.post(HOSPITALS, status=status, body="<html>busy</html>", content_type="text/html")

    answer = await create(client)

    assert (answer.outcome, answer.status) == (outcome, status)
    assert answer.message == f"HTTP {status}"


async def test_a_404_is_not_found(mocked: aioresponses, client: DirectoryClient) -> None:
    mocked.patch(f"{BATCH}/activate", status=404, payload={"detail": NO_SUCH_BATCH})

    answer = await client.activate(BATCH_ID)

    assert (answer.outcome, answer.message) == (Outcome.NOT_FOUND, NO_SUCH_BATCH)


@pytest.mark.parametrize(
    ("payload", "body"),
    [({"detail": "Not Found"}, None), (None, "<html>Not Found</html>")],
    ids=["wrong-path", "proxy-page"],
)
@pytest.mark.parametrize("call", ["batch_members", "activate", "delete_batch"])
async def test_a_batch_404_in_other_words_proves_nothing(
    mocked: aioresponses,
    client: DirectoryClient,
    call: str,
    payload: dict[str, str] | None,
    body: str | None,
) -> None:
    # Read as empty, such a 404 would mark rows not stored, and they would be created twice.
    method = {"batch_members": mocked.get, "activate": mocked.patch, "delete_batch": mocked.delete}
    url = f"{BATCH}/activate" if call == "activate" else BATCH
    if payload is not None:
        method[call](url, status=404, payload=payload)
    else:
        method[call](url, status=404, body=body, content_type="text/html")

    answer = await getattr(client, call)(BATCH_ID)

    assert (answer.outcome, answer.status, answer.body) == (Outcome.AMBIGUOUS, 404, payload)


async def test_a_redirect_is_not_followed(mocked: aioresponses, client: DirectoryClient) -> None:
    mocked.post(HOSPITALS, status=307, headers={"Location": f"{BASE}/elsewhere"})
    mocked.get(f"{BASE}/elsewhere", payload=HOSPITAL)

    answer = await create(client)

    assert (answer.outcome, answer.status) == (Outcome.REJECTED, 307)
    assert ("GET", URL(f"{BASE}/elsewhere")) not in mocked.requests


# Network failures: provably unsent, or maybe committed --------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connection refused")),
        aiohttp.ConnectionTimeoutError("Connection timeout to host"),
    ],
    ids=["connect-refused", "connect-timeout"],
)
async def test_a_failure_to_connect_is_not_sent(
    mocked: aioresponses, client: DirectoryClient, error: Exception
) -> None:
    mocked.post(HOSPITALS, exception=error)

    answer = await create(client)

    assert (answer.outcome, answer.status, answer.body) == (Outcome.NOT_SENT, None, None)
    assert answer.message.startswith("cannot connect")


async def test_a_real_refused_connection_is_not_sent() -> None:
    with socket.socket() as probe:  # a loopback port that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = DirectorySettings(base_url=f"http://127.0.0.1:{port}")
    async with DirectoryClient.new_session(settings) as session:
        answer = await DirectoryClient(session, settings).create("a", "b", None, BATCH_ID)

    assert answer.outcome is Outcome.NOT_SENT


async def test_a_connection_given_up_on_is_reset_not_closed() -> None:
    # Closed gracefully, a create the path has not delivered yet (a blackhole) stays in the
    # kernel, which retransmits it until the path is back, long after the check that found
    # no record of it: the row is then stored twice. A reset drops it.
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # to the end of the connection: never answered
            ended.set_result("closed")
        except ConnectionResetError:
            ended.set_result("reset")
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = DirectorySettings(base_url=f"http://127.0.0.1:{port}", read_timeout=0.2)
    async with server, DirectoryClient.new_session(settings) as session:
        answer = await DirectoryClient(session, settings).create("a", "b", None, BATCH_ID)

        assert answer.outcome is Outcome.AMBIGUOUS
        assert await asyncio.wait_for(ended, 5) == "reset"


async def test_no_more_calls_than_concurrency_reach_the_directory_at_once(
    directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The session's pool is the one cap on requests in flight (the directory asks for 20 at
    # most), however many callers there are.
    standin = directory.standin
    standin.set_delay(0.05)
    commit, in_flight, most = standin.commit_create, 0, 0

    async def counted(new: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await commit(new)
        finally:
            in_flight -= 1

    monkeypatch.setattr(standin, "commit_create", counted)
    settings = DirectorySettings(base_url=directory.url, concurrency=2)
    async with DirectoryClient.new_session(settings) as session:
        client = DirectoryClient(session, settings)
        answers = await asyncio.gather(
            *(client.create(f"Hospital {n}", "Main St", None, BATCH_ID) for n in range(6))
        )

    assert [answer.outcome for answer in answers] == [Outcome.OK] * 6
    assert most == 2


@contextlib.asynccontextmanager
async def answering(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], **settings: Any
) -> AsyncIterator[DirectoryClient]:
    """A client of a directory on loopback whose creates `handler` answers."""
    app = web.Application()
    app.router.add_post("/hospitals/", handler)
    async with serving(app) as url:
        config = DirectorySettings(base_url=url, **settings)
        async with DirectoryClient.new_session(config) as session:
            yield DirectoryClient(session, config)


async def test_an_answer_that_drips_past_the_read_timeout_is_ambiguous() -> None:
    # Each byte comes well within the read timeout, the whole answer does not: held for as
    # long as the drip lasts, the row and a rollback waiting for it would be held too.
    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=201)
        await response.prepare(request)
        for _ in range(100):
            await response.write(b" ")
            await asyncio.sleep(0.02)
        return response

    async with answering(drip, read_timeout=0.3) as client:
        started = time.monotonic()
        answer = await create(client)
        waited = time.monotonic() - started

    assert answer.outcome is Outcome.AMBIGUOUS
    assert 0.3 <= waited < 1.5


@pytest.mark.parametrize(
    ("how", "size"),
    [
        ("content-length", 100_000),
        ("content-length", 1001),  # one byte past it
        ("chunked", 100_000),
        ("chunked", 1001),
        ("gzip-with-length", 100_000),
    ],
)
async def test_an_answer_past_the_size_limit_is_ambiguous(
    monkeypatch: pytest.MonkeyPatch, how: str, size: int
) -> None:
    # A proxy's or a broken server's answer of gigabytes would be held whole, 20 at a time;
    # compressed, its declared length is that of what comes, not of what it expands to.
    monkeypatch.setattr(directory_client, "MAX_ANSWER_BYTES", 1000)

    async def huge(request: web.Request) -> web.StreamResponse:
        if how == "gzip-with-length":
            headers = {"Content-Encoding": "gzip"}
            return web.Response(status=500, body=gzip.compress(b"x" * size), headers=headers)
        response = web.StreamResponse(status=500)
        if how == "content-length":
            response.content_length = size
        await response.prepare(request)
        for start in range(0, size, 1000):
            await response.write(b"x" * min(1000, size - start))
        return response

    async with answering(huge) as client:
        answer = await create(client)

    assert (answer.outcome, answer.status) == (Outcome.AMBIGUOUS, None)
    assert "bytes" in answer.message


@pytest.mark.parametrize(
    "error",
    [
        aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
        TimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
        ConnectionResetError(104, "Connection reset by peer"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ],
    ids=[
        "read-timeout",
        "total-timeout",
        "disconnected",
        "client-os",
        "client-reset",
        "bare-reset",
        "cut-off",
    ],
)
async def test_a_failure_after_sending_is_ambiguous(
    mocked: aioresponses, client: DirectoryClient, error: Exception
) -> None:
    mocked.post(HOSPITALS, exception=error)

    answer = await create(client)

    assert (answer.outcome, answer.status, answer.body) == (Outcome.AMBIGUOUS, None, None)
    assert type(error).__name__ in answer.message


async def test_an_unreadable_200_is_ambiguous(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.post(HOSPITALS, status=200, body='{"id": 12, "na')

    answer = await create(client)

    assert answer.outcome is Outcome.AMBIGUOUS
    assert not answer.ok


async def test_an_empty_200_is_ok_without_a_body(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.delete(BATCH, status=200, body="")

    answer = await client.delete_batch(BATCH_ID)

    assert (answer.outcome, answer.body) == (Outcome.OK, None)


# Batch calls ------------------------------------------------------------------------------


async def test_batch_members_lists_the_batch(mocked: aioresponses, client: DirectoryClient) -> None:
    mocked.get(BATCH, payload=[HOSPITAL])

    answer = await client.batch_members(BATCH_ID)

    assert (answer.outcome, answer.body) == (Outcome.OK, [HOSPITAL])
    assert only_call(mocked, "GET", BATCH).kwargs["allow_redirects"] is False


async def test_batch_members_reads_a_404_as_no_hospitals_yet(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.get(BATCH, status=404, payload={"detail": NO_SUCH_BATCH})

    answer = await client.batch_members(BATCH_ID)

    assert (answer.outcome, answer.status, answer.body) == (Outcome.OK, 404, [])


@pytest.mark.parametrize("body", ['{"detail": "odd"}', "null", ""])
async def test_batch_members_that_are_not_a_list_are_ambiguous(
    mocked: aioresponses, client: DirectoryClient, body: str
) -> None:
    mocked.get(BATCH, body=body)

    answer = await client.batch_members(BATCH_ID)

    assert (answer.outcome, answer.body) == (Outcome.AMBIGUOUS, None)


async def test_batch_members_list_a_hospital_listed_twice_once(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    # Counted twice, one record would let two identical rows claim the same hospital.
    other = {**HOSPITAL, "id": 13}
    mocked.get(BATCH, payload=[HOSPITAL, other, dict(HOSPITAL)])

    answer = await client.batch_members(BATCH_ID)

    assert (answer.outcome, answer.body) == (Outcome.OK, [HOSPITAL, other])


@pytest.mark.parametrize(
    "entry",
    [
        None,
        "x",
        {**HOSPITAL, "id": None},
        {**HOSPITAL, "id": "12"},
        {**HOSPITAL, "id": True},  # JSON's true: a bool is an int to Python
        {**HOSPITAL, "name": "Other"},
    ],
)
async def test_batch_members_with_an_entry_that_is_not_a_hospital_are_ambiguous(
    mocked: aioresponses, client: DirectoryClient, entry: Any
) -> None:
    # Not a hospital with an id, or the same id as another record that differs from it.
    mocked.get(BATCH, payload=[HOSPITAL, entry])

    answer = await client.batch_members(BATCH_ID)

    assert (answer.outcome, answer.body) == (Outcome.AMBIGUOUS, None)
    assert "not a list of hospitals" in answer.message


async def test_batch_members_passes_other_failures_through(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.get(BATCH, status=429, payload={"error": "Rate limit exceeded: 50 per 1 minute"})

    answer = await client.batch_members(BATCH_ID)

    assert answer.outcome is Outcome.RATE_LIMITED


async def test_activate_patches_the_batch_activate_path(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    body = {"activated_count": 2, "message": f"Activated 2 hospital(s) with batch ID {BATCH_ID}"}
    mocked.patch(f"{BATCH}/activate", payload=body)

    answer = await client.activate(BATCH_ID)

    assert (answer.outcome, answer.body) == (Outcome.OK, body)
    assert list(mocked.requests) == [("PATCH", URL(f"{BATCH}/activate"))]


async def test_a_second_activation_is_rejected(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    detail = "Cannot activate batch: one or more hospitals in the batch are already active"
    mocked.patch(f"{BATCH}/activate", status=400, payload={"detail": detail})

    answer = await client.activate(BATCH_ID)

    assert (answer.outcome, answer.message) == (Outcome.REJECTED, detail)


async def test_delete_batch_deletes_the_batch_path(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    body = {"deleted_count": 2, "message": f"Deleted 2 hospital(s) with batch ID {BATCH_ID}"}
    mocked.delete(BATCH, payload=body)

    answer = await client.delete_batch(BATCH_ID)

    assert (answer.outcome, answer.body) == (Outcome.OK, body)
    assert list(mocked.requests) == [("DELETE", URL(BATCH))]


async def test_warm_up_gets_the_root_with_the_long_timeout(mocked: aioresponses) -> None:
    settings = DirectorySettings(base_url=BASE, warmup_timeout=75.0)
    mocked.get(f"{BASE}/", payload={"status": "OK"})
    async with aiohttp.ClientSession() as session:
        answer = await DirectoryClient(session, settings).warm_up()

    assert (answer.outcome, answer.body) == (Outcome.OK, {"status": "OK"})
    assert list(mocked.requests) == [("GET", URL(f"{BASE}/"))]
    assert only_call(mocked, "GET", f"{BASE}/").kwargs["timeout"].total == 75.0


# Reachability -----------------------------------------------------------------------------


async def test_reachability_is_unknown_before_any_call(client: DirectoryClient) -> None:
    assert client.reachability.reachable is None
    assert client.reachability.last_call_at is None
    assert math.isinf(client.idle_for())


async def test_an_answer_marks_the_directory_reachable(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.post(HOSPITALS, exception=aiohttp.ServerDisconnectedError())
    mocked.post(HOSPITALS, status=429, payload={"error": "Rate limit exceeded"})
    await create(client)

    await create(client)

    r = client.reachability
    assert (r.reachable, r.last_error) == (True, None)
    assert r.last_success_at is not None
    assert 0 <= client.idle_for() < 1


async def test_a_network_failure_marks_the_directory_unreachable(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.get(f"{BASE}/", payload={"status": "OK"})
    mocked.post(HOSPITALS, exception=aiohttp.ClientConnectorError(KEY, ConnectionRefusedError()))
    await client.warm_up()
    success_at = client.reachability.last_success_at

    await create(client)

    r = client.reachability
    assert r.reachable is False
    assert r.last_error is not None and r.last_error.startswith("cannot connect")
    assert r.last_success_at == success_at  # the last answer is still remembered
    assert r.last_call_at is not None and success_at is not None
    assert r.last_call_at >= success_at
    assert client.idle_for() < 1


async def test_a_5xx_marks_the_directory_unreachable(
    mocked: aioresponses, client: DirectoryClient
) -> None:
    mocked.post(HOSPITALS, status=502, payload={"detail": "Bad Gateway"})

    await create(client)

    assert (client.reachability.reachable, client.reachability.last_error) == (
        False,
        "Bad Gateway",
    )
    assert math.isinf(client.idle_for())
