"""The command-line client and the demo against a running service and the local directory."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import pty
import re
import shlex
import signal
import socket
import sys
import time
import types
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from rich.console import Console
from yarl import URL

from service.__main__ import main
from service.client import run
from service.client.api import ServiceApi
from service.client.display import TABLE_ROWS, Watch
from service.client.follow import follow
from service.domain import batch as b
from service.domain import events as ev
from service.local_directory import RunningDirectory
from service.store.records import NewEvent
from service.web.keys import SOCKETS, STORE
from tests.integration.conftest import completing, new_batch
from tests.support import (
    SAMPLE_CSV,
    Service,
    ServiceFactory,
    csv_of,
    fast_settings,
    fill_upstream_batch,
    free_port,
    keyed_batch,
    running_service,
    serving,
)

PROJECT = Path(__file__).resolve().parents[2]


class Captured:
    """Consoles that write into strings, a terminal or not."""

    def __init__(self, terminal: bool = False, width: int = 160) -> None:
        self.out_file, self.err_file = io.StringIO(), io.StringIO()
        self.out = Console(file=self.out_file, force_terminal=terminal, width=width)
        self.err = Console(file=self.err_file, force_terminal=False, width=160)

    @property
    def stdout(self) -> str:
        return self.out_file.getvalue()

    @property
    def stderr(self) -> str:
        return self.err_file.getvalue()


async def client(captured: Captured, *argv: str) -> int:
    return await run(list(argv), out=captured.out, err=captured.err)


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "hospitals.csv"
    path.write_text(SAMPLE_CSV)
    return path


async def test_upload_follow_prints_progress_lines_and_the_results(
    service: Service, sample: Path
) -> None:
    captured = Captured()
    status = await client(captured, "upload", str(sample), "--url", service.url, "--follow")

    assert status == 0, captured.stderr
    lines = captured.stdout.splitlines()
    batch_id = re.search(r"Batch (\S+) accepted: 3 hospital", lines[0])
    assert batch_id is not None
    progress = [line for line in lines if " done, " in line]
    done = [int(n) for line in progress for n in re.findall(r" (\d)/3 done", line)]
    assert len(done) == len(progress)
    assert done == sorted(done) and done[-1] == 3
    assert "rows/min, ETA" in progress[-1]
    for name in ("General Hospital", "City Medical Center", "Community Hospital"):
        assert name in captured.stdout
    assert captured.stdout.count("created_and_activated") == 3
    assert "not listed here" not in captured.stdout  # a short batch lists every row
    assert "completed: 3 created, 0 failed" in lines[-1]
    final = await service.wait_finished(batch_id.group(1))
    assert final["processing_status"] == "completed"


async def test_without_follow_an_upload_says_how_to_follow_and_returns(
    service: Service, sample: Path
) -> None:
    captured = Captured(terminal=True, width=60)  # narrower than the command
    status = await client(captured, "upload", str(sample), "--url", service.url)

    assert status == 0, captured.stderr
    text = plain(captured.stdout)
    batch_id = re.search(r"Batch (\S+) accepted", text)
    assert batch_id is not None
    command = f"python -m service follow {batch_id.group(1)} --url {service.url}"
    assert any(command in line for line in text.splitlines()), text  # pasted, it runs
    assert " done, " not in text and "completed:" not in text


Rewrite = Callable[[dict[str, Any]], dict[str, Any]]


@contextlib.asynccontextmanager
async def behind_a_proxy(
    service: Service,
    prefix: str,
    first: str | None = None,
    rewrite: Rewrite | None = None,
    idle: float | None = None,
    upgrades: bool = True,
    redirect: int | None = None,
    hangs: bool = False,
) -> AsyncIterator[str]:
    """A reverse proxy on loopback that serves the service under `prefix`, websocket too.

    `first`, when given, is sent on each websocket before the service's messages;
    `rewrite` changes each of the service's JSON answers and messages; `idle` cuts a
    websocket quiet that many seconds (a proxy's read timeout); without `upgrades`, a
    websocket handshake goes on as a plain GET (a proxy that drops Upgrade); `redirect`
    answers every path outside `prefix` with that status and a Location under it; `hangs`
    holds every plain request unanswered (a service that stopped, its sockets cut by `idle`)."""
    released = asyncio.Event()

    def rewritten(text: str) -> str:
        return text if rewrite is None else json.dumps(rewrite(json.loads(text)))

    async def forward(request: web.Request) -> web.StreamResponse:
        target = URL(service.url + request.match_info["tail"]).with_query(request.query)
        if upgrades and request.headers.get("Upgrade", "").lower() == "websocket":
            inward = web.WebSocketResponse()
            await inward.prepare(request)
            if first is not None:
                await inward.send_str(first)
            async with service.http.ws_connect(target) as outward:
                while True:
                    try:
                        message = await outward.receive(timeout=idle)
                    except TimeoutError:
                        assert request.transport is not None
                        request.transport.close()  # no close frame: the connection is cut
                        return inward
                    if message.type is not aiohttp.WSMsgType.TEXT:
                        break
                    await inward.send_str(rewritten(message.data))
            await inward.close()
            return inward
        if hangs:
            await released.wait()
        headers = {"Content-Type": request.headers.get("Content-Type", "")}
        body = await request.read()
        async with service.http.request(
            request.method, target, data=body, headers=headers
        ) as answer:
            body = await answer.read()
            if answer.content_type == "application/json":
                body = rewritten(body.decode()).encode()
            return web.Response(status=answer.status, body=body, content_type=answer.content_type)

    async def move(request: web.Request) -> web.Response:
        assert redirect is not None
        return web.Response(status=redirect, headers={"Location": prefix + request.path_qs})

    app = web.Application()
    app.router.add_route("*", prefix + "{tail:/.*}", forward)
    if redirect is not None:
        app.router.add_route("*", "/{tail:.*}", move)
    async with serving(app) as url:
        try:
            yield url + prefix
        finally:
            released.set()


async def test_a_service_behind_a_path_prefix_is_reached_under_it(
    service: Service, sample: Path, tmp_path: Path
) -> None:
    async with behind_a_proxy(service, "/hospitals-loader") as url:
        captured = Captured()
        status = await client(captured, "upload", str(sample), "--url", url, "--follow")
        assert status == 0, captured.stderr
        batch_id = re.search(r"Batch (\S+) accepted", captured.stdout)
        assert batch_id is not None
        assert "completed: 3 created, 0 failed" in captured.stdout  # followed over the proxy

        output = tmp_path / "results.csv"
        argv = ("results", batch_id.group(1), "--url", url + "/", "-o", str(output))
        assert await client(Captured(), *argv) == 0
        assert output.read_text().count("created_and_activated") == 3


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "notice", "text": "maintenance at 22:00"}',  # a later service's
        "<html>502 Bad Gateway</html>",  # a proxy's, not JSON
        '["event"]',
        '{"type": "event", "progress": null}',  # no version to resume after
    ],
)
async def test_a_websocket_frame_the_client_cannot_show_is_skipped(
    service: Service, frame: str
) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    await service.wait_finished(accepted["batch_id"])
    async with behind_a_proxy(service, "/loader", first=frame) as url:
        captured = Captured()
        status = await client(captured, "follow", accepted["batch_id"], "--url", url)

    assert status == 0, captured.stderr
    assert "completed: 3 created, 0 failed" in captured.stdout


def nulled(part: str | None, field: str, dropped: bool = False) -> Rewrite:
    """A rewrite that makes `field` null (of a message's `part`, "progress" or "status",
    when given), or leaves it out when `dropped`, wherever the service sends it."""

    def rewrite(body: dict[str, Any]) -> dict[str, Any]:
        inner = body.get(part) if part else body
        if isinstance(inner, dict) and field in inner:
            if dropped:
                del inner[field]
            else:
                inner[field] = None
        return body

    return rewrite


async def test_null_or_missing_fields_are_shown_as_unknown_or_refused_without_a_traceback(
    service: Service, sample: Path
) -> None:
    # A proxy or a service of another version: each was a traceback and exit 1 ("failed").
    batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
    await service.wait_finished(batch_id)
    follow, upload = ["follow", batch_id], ["upload", str(sample)]
    cases: list[tuple[list[str], Rewrite, bool, int, str]] = [
        (upload, nulled(None, "batch_id", dropped=True), False, 2, "the answer lacks batch_id"),
        (upload, nulled(None, "warnings"), False, 0, "accepted: 3 hospital(s)"),
        (follow, nulled("status", "processing_time_seconds"), False, 0, "activated: yes; ? s"),
        (follow, nulled("status", "failed_hospitals"), False, 0, "completed: ? created, ? failed"),
        (follow, nulled("status", "hospitals", dropped=True), False, 0, "completed: 3 created"),
        (follow, nulled("progress", "current_message"), False, 0, "3/3 done, 0 failed"),
        (follow, nulled("progress", "processed_hospitals"), False, 0, "?/3 done"),
        (follow, nulled("progress", "processed_hospitals"), True, 0, "completed: 3 created"),
        (["rollback", batch_id], nulled(None, "current_message"), False, 0, f"{batch_id}: ?"),
    ]
    for argv, rewrite, terminal, expected, says in cases:
        async with behind_a_proxy(service, "/loader", rewrite=rewrite) as url:
            captured = Captured(terminal=terminal)
            status = await client(captured, *argv, "--url", url)
        shown = plain(captured.stdout + captured.stderr)
        assert (status, says in shown) == (expected, True), (argv, says, shown[-800:])
        if status == 2:
            assert f"is {url} the service's address?" in captured.stderr


async def test_a_url_with_a_query_or_a_fragment_still_reaches_the_service(
    service: Service, sample: Path
) -> None:
    for url in (service.url + "/?token=x", service.url + "#top"):
        captured = Captured()
        status = await client(captured, "upload", str(sample), "--url", url, "--follow")
        assert status == 0, captured.stderr
        assert "completed: 3 created, 0 failed" in captured.stdout


BAD_SECONDS = "expected a positive number of seconds, got {!r}"
BAD_URL = "expected an http:// or https:// URL, got {!r}"


@pytest.mark.parametrize(
    ("option", "given", "says"),
    [
        *(("--reconnect-timeout", given, BAD_SECONDS) for given in ["-5", "0", "nan", "soon"]),
        *(
            ("--url", given, BAD_URL)
            for given in ["http://[bad", "localhost:8000", "http://", "ftp://x"]
        ),
    ],
)
async def test_a_malformed_option_is_a_usage_error_that_names_it(
    option: str, given: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        await client(Captured(), "follow", str(uuid.uuid4()), option, given)

    assert exited.value.code == 2
    assert says.format(given) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "given"),
    [
        ("follow", ".."),  # /batch/../ws is /ws: the dashboard, followed silently forever
        ("follow", "%2E%2E"),
        ("follow", "x?after=3"),
        ("resume", "."),
        ("rollback", "a/b"),
        ("results", ".."),
    ],
)
async def test_a_batch_id_that_is_not_a_uuid_is_a_usage_error_not_another_route(
    service: Service, command: str, given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        async with asyncio.timeout(10):
            await client(Captured(), command, given, "--url", service.url)

    assert exited.value.code == 2
    assert f"{given!r} is not a batch id (a UUID)" in capsys.readouterr().err


async def test_a_batch_id_is_taken_in_any_spelling_the_service_takes(service: Service) -> None:
    batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
    await service.wait_finished(batch_id)
    captured = Captured()

    status = await client(captured, "follow", "{" + batch_id.upper() + "}", "--url", service.url)

    assert status == 0, captured.stderr
    assert f"Batch {batch_id}" in captured.stdout


async def test_on_a_terminal_the_progress_is_a_rich_bar(service: Service, sample: Path) -> None:
    captured = Captured(terminal=True)
    status = await client(captured, "upload", str(sample), "--url", service.url, "--follow")

    assert status == 0
    assert "━" in captured.stdout  # rich's bar
    assert "3/3" in captured.stdout and "rows/min" in captured.stdout
    assert " done, " not in captured.stdout  # no plain lines


async def test_a_partial_batch_exits_1_and_a_resume_that_completes_it_exits_0(
    service_factory: ServiceFactory, directory: RunningDirectory, sample: Path, db_path: Path
) -> None:
    key, batch_id = keyed_batch(db_path, "cli")
    others = await fill_upstream_batch(directory, batch_id, 19)
    first, second, refused = Captured(), Captured(), Captured()
    async with service_factory(concurrency=1) as service:  # one create at a time: exact cap
        url = ["--url", service.url]
        partial = await client(
            first, "upload", str(sample), *url, "--follow", "--idempotency-key", key
        )
        async with aiohttp.ClientSession() as http:
            for hospital_id in others[:5]:
                async with http.delete(f"{directory.url}/hospitals/{hospital_id}") as r:
                    assert r.status == 204
        resumed = await client(second, "resume", batch_id, *url, "--follow")
        again = await client(refused, "resume", batch_id, *url)

    assert partial == 1
    assert "partially_completed: 1 created, 2 failed" in first.stdout
    assert "Batch cannot exceed 20 hospitals" in first.stdout
    assert resumed == 0, second.stderr
    assert "completed: 3 created, 0 failed" in second.stdout
    assert again == 2
    assert "HTTP 409" in refused.stderr and "nothing to resume" in refused.stderr


async def test_a_refused_upload_exits_2_with_the_servers_messages(
    service: Service, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("hospital,str\x1b[2Jeet\nA,B\n")
    captured = Captured()
    assert await client(captured, "upload", str(bad), "--url", service.url, "--follow") == 2
    assert "HTTP 422" in captured.stderr
    assert "name" in captured.stderr  # the missing column, as the server names it
    assert "found: hospital,str\\x1b[2Jeet" in captured.stderr  # not an escape sequence
    assert captured.stdout == ""

    missing = Captured()
    assert await client(missing, "upload", str(tmp_path / "nope.csv"), "--url", service.url) == 2
    assert "cannot read" in missing.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    unreachable = Captured()
    url = f"http://127.0.0.1:{closed_port}"
    assert await client(unreachable, "upload", str(bad), "--url", url) == 2
    assert "cannot reach the service" in unreachable.stderr
    assert "may have been accepted" not in unreachable.stderr  # nothing was sent


async def test_results_and_rollback(service: Service, sample: Path, tmp_path: Path) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    batch_id = accepted["batch_id"]
    await service.wait_finished(batch_id)
    url = ["--url", service.url]
    output, failed = tmp_path / "results.csv", tmp_path / "failed.csv"

    assert await client(Captured(), "results", batch_id, *url, "-o", str(output)) == 0
    assert (
        await client(Captured(), "results", batch_id, *url, "--only", "failed", "-o", str(failed))
        == 0
    )
    rolled = Captured()
    assert await client(rolled, "rollback", batch_id, *url, "--follow") == 0
    after_rollback = tmp_path / "after.csv"
    assert await client(Captured(), "results", batch_id, *url, "-o", str(after_rollback)) == 0
    unknown, unknown_follow = Captured(), Captured()
    assert await client(unknown, "results", str(uuid.uuid4()), *url) == 2
    assert await client(unknown_follow, "follow", str(uuid.uuid4()), *url) == 2

    lines = output.read_text().splitlines()
    assert lines[0] == "row,name,address,phone,status,hospital_id,error_message"
    assert len(lines) == 4 and all(",created_and_activated," in line for line in lines[1:])
    assert failed.read_text().splitlines() == ["name,address,phone"]
    assert "rolled back" in rolled.stdout.lower() and "3 deleted" in rolled.stdout
    assert [line.split(",")[4] for line in after_rollback.read_text().splitlines()[1:]] == [
        "deleted"
    ] * 3
    assert "HTTP 404" in unknown.stderr and "not found" in unknown.stderr
    assert "HTTP 404" in unknown_follow.stderr and "not found" in unknown_follow.stderr
    assert "the service's address?" not in unknown.stderr + unknown_follow.stderr


async def test_follow_reconnects_after_a_resync_and_loses_nothing(
    directory: RunningDirectory, db_path: Path
) -> None:
    settings = fast_settings(db_path, directory.url).replace(websocket={"max_backlog": 1})
    async with running_service(settings) as service:
        batch_id = str(uuid.uuid4())
        store, stream = service.app[STORE], b.stream_id(batch_id)
        await store.append(stream, -1, new_batch(batch_id, rows=2))
        captured = Captured()
        following = asyncio.create_task(client(captured, "follow", batch_id, "--url", service.url))
        async with asyncio.timeout(5):
            while True:  # until the client's websocket is open
                if service.app[SOCKETS]:
                    break
                await asyncio.sleep(0.01)
        await store.append(stream, 0, completing(batch_id))
        async with asyncio.timeout(10):
            status = await following

    assert status == 0, captured.stderr
    assert "code 4000" in captured.stdout and "reconnecting after version 1" in captured.stdout
    assert "completed: 2 created, 0 failed" in captured.stdout


async def test_a_redirect_that_would_make_a_post_a_get_says_where_the_service_moved(
    service: Service, sample: Path
) -> None:
    # aiohttp follows a 301 or 302 with a GET: the service answered 405, and nobody
    # said the address had moved. 307 and 308 keep the POST and its body.
    for code in (301, 302, 307, 308):
        async with behind_a_proxy(service, "/new", redirect=code) as url:
            captured = Captured()
            status = await client(captured, "upload", str(sample), "--url", url[: -len("/new")])
        if code in (307, 308):
            assert status == 0, (code, captured.stderr)
            assert "accepted: 3 hospital(s)" in captured.stdout
        else:
            assert status == 2, code
            assert f"redirects to {url} (HTTP {code}): use that as --url" in captured.stderr
            assert "HTTP 405" not in captured.stderr  # a bare "405" may be in the port


async def test_a_proxy_that_drops_the_upgrade_header_gets_the_service_s_reason(
    service: Service,
) -> None:
    batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
    await service.wait_finished(batch_id)
    async with behind_a_proxy(service, "/loader", upgrades=False) as url:
        captured = Captured()
        status = await client(captured, "follow", batch_id, "--url", url)

    assert status == 2
    assert "HTTP 400" in captured.stderr
    assert "this route is a websocket: connect with a websocket client" in captured.stderr
    assert "must pass websocket upgrades on" in captured.stderr


@pytest.mark.parametrize(("idle", "expected"), [(0.3, 0), (0.05, 3)], ids=["idle", "at-once"])
async def test_a_proxy_that_cuts_quiet_websockets_is_followed_but_one_that_cuts_at_once_is_not(
    service: Service, monkeypatch: pytest.MonkeyPatch, idle: float, expected: int
) -> None:
    # A socket open CONTACT_SECONDS (1 s, here 0.2) was contact: with every reconnect
    # made, a proxy's idle timeout ended the follow with 3 once the batch was quiet for
    # --reconnect-timeout. A socket cut as soon as it opens still gives up then.
    monkeypatch.setattr("service.client.follow.CONTACT_SECONDS", 0.2, raising=False)
    batch_id = str(uuid.uuid4())
    store, stream = service.app[STORE], b.stream_id(batch_id)
    await store.append(stream, -1, new_batch(batch_id, rows=2))
    async with behind_a_proxy(service, "/loader", idle=idle) as url:
        captured = Captured()
        argv = ("follow", batch_id, "--url", url, "--reconnect-timeout", "0.4")
        following = asyncio.create_task(client(captured, *argv))
        await asyncio.wait([following], timeout=1.2)  # cut three times, all quiet
        await store.append(stream, 0, completing(batch_id))
        async with asyncio.timeout(5):
            status = await following

    assert status == expected, captured.stdout + captured.stderr
    if expected == 0:
        assert captured.stdout.count("reconnecting after version 0") >= 2
        assert "completed: 2 created, 0 failed" in captured.stdout
    else:
        assert "gave up after 0.4s" in captured.stderr


async def test_a_service_gone_is_given_up_on_at_the_reconnect_timeout_not_a_retry_later() -> None:
    # The tries back off up to 5 s apart: --reconnect-timeout 2 gave up after 3.4 s.
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    captured = Captured()
    started = time.monotonic()
    status = await client(
        captured, "follow", str(uuid.uuid4()), "--url", url, "--reconnect-timeout", "2"
    )
    took = time.monotonic() - started

    assert status == 3, captured.stdout + captured.stderr
    assert "gave up after 2s" in captured.stderr
    assert took < 2.5


async def test_a_service_that_stops_answering_while_followed_ends_at_the_reconnect_timeout(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The quiet socket's /progress waited aiohttp's 5 minutes: a service stopped (SIGSTOP,
    # a hung host) in the middle of a batch ended `follow --reconnect-timeout 5` after 319 s.
    monkeypatch.setattr("service.client.api.HEALTH_SECONDS", 0.2, raising=False)
    monkeypatch.setattr("service.client.follow.QUIET_SECONDS", 0.2)
    batch_id = str(uuid.uuid4())
    await service.app[STORE].append(b.stream_id(batch_id), -1, new_batch(batch_id, rows=2))
    async with behind_a_proxy(service, "/loader", idle=0.5, hangs=True) as url:
        captured = Captured()
        argv = ("follow", batch_id, "--url", url, "--reconnect-timeout", "0.5")
        async with asyncio.timeout(10):
            status = await client(captured, *argv)

    assert status == 3, captured.stdout + captured.stderr
    assert "gave up after 0.5s" in captured.stderr


async def test_a_quiet_socket_is_explained_also_when_the_service_pings_more_often(
    directory: RunningDirectory, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # receive()'s timeout starts again with every ping and pong: with a
    # websocket.heartbeat_seconds under QUIET_SECONDS the socket never counted as quiet, so
    # /progress was never asked and a wait for the directory's rate window never shown.
    monkeypatch.setattr("service.client.follow.QUIET_SECONDS", 0.6)
    settings = fast_settings(db_path, directory.url).replace(websocket={"heartbeat_seconds": 0.2})
    batch_id = str(uuid.uuid4())
    said: list[str] = []
    async with running_service(settings) as service:
        store = service.app[STORE]
        await store.append(b.stream_id(batch_id), -1, new_batch(batch_id, rows=2))
        api = ServiceApi(service.http, URL(service.url))
        following = asyncio.create_task(
            follow(api, batch_id, lambda message: None, lambda note: None, 5.0, said.append)
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):  # five quiet spells
                while not said:
                    await asyncio.sleep(0.05)
        await store.append(b.stream_id(batch_id), 0, completing(batch_id))
        async with asyncio.timeout(5):
            final = await following

    assert said, "the quiet socket was never explained"
    assert final["status"]["processing_status"] == "completed"


async def test_the_command_line_runs_as_a_process(service: Service, sample: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "upload",
        str(sample),
        "--url",
        service.url,
        "--follow",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=PROJECT,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()

    assert process.returncode == 0, stderr.decode()
    text = stdout.decode()
    assert "3/3 done" in text and "completed: 3 created" in text
    assert "City Medical Center" in text  # the table is not wrapped to 80 columns
    assert "accepted: 3 hospital(s) from hospitals.csv" in text


async def into_head(*argv: str) -> tuple[int, bytes, bytes]:
    """`python -m service ARGV | head -1`: the command's exit status, what head printed,
    and the command's stderr."""
    line = '"$0" -m service "$@" | head -1; exit "${PIPESTATUS[0]}"'
    process = await asyncio.create_subprocess_exec(
        *("bash", "-c", line, sys.executable, *argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=PROJECT,
    )
    async with asyncio.timeout(20):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def test_following_into_a_reader_that_leaves_ends_quietly(
    service: Service, directory: RunningDirectory, sample: Path
) -> None:
    directory.standin.set_delay(0.5)
    status, stdout, stderr = await into_head(
        "upload", str(sample), "--url", service.url, "--follow"
    )

    assert b"accepted: 3 hospital(s)" in stdout
    assert status == 141, stderr.decode()  # not 1, which says the batch failed
    assert stderr == b""


async def test_ctrl_c_stops_following_and_leaves_the_batch_running(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(5.0)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "service", "follow"),
        (await service.upload(SAMPLE_CSV))["batch_id"],
        *("--url", service.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=PROJECT,
        # A suite started in the background inherits an ignored SIGINT, which Python keeps.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        first = await process.stdout.readline()  # following: the snapshot's line
        process.send_signal(signal.SIGINT)
        rest, _ = await process.communicate()

    assert b" 0/3 done" in first
    assert process.returncode == 130
    assert b"this does not stop the batch" in rest and b"python -m service follow" in rest


def test_ctrl_c_while_a_command_loads_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Loading(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise KeyboardInterrupt  # as when Ctrl-C lands while the client's libraries load

    monkeypatch.setitem(sys.modules, "service.client", Loading("service.client"))
    # main points the stdout it was given at /dev/null: a file of this test's own, not
    # the descriptor pytest captures output through.
    with (tmp_path / "stdout").open("w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["upload", "hospitals.csv"]) == 130


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.asynccontextmanager
async def running_demo(
    tmp_path: Path, port: int, *options: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m service demo` on `port` and a free directory port, output piped; killed
    on the way out if it is still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "demo",
        "--port",
        str(port),
        "--directory-port",
        str(free_port(other_than=port)),
        "--create-delay",
        "0.05",
        "--database",
        str(tmp_path / "demo.db"),
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=PROJECT,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def interrupt(process: asyncio.subprocess.Process) -> str:
    """Ctrl-C the demo; the rest of its output once it has exited."""
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        rest, _ = await process.communicate()
    return rest.decode()


async def lines_until_ctrl_c(process: asyncio.subprocess.Process) -> list[str]:
    """The demo's output up to its "press Ctrl-C" line."""
    assert process.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(40):
        while not lines or "Ctrl-C" not in lines[-1]:
            line = await process.stdout.readline()
            assert line, "\n".join(lines)
            lines.append(line.decode().rstrip())
    return lines


async def test_the_demo_runs_both_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    async with running_demo(tmp_path, port) as process:
        lines = await lines_until_ctrl_c(process)
        directory_port = re.search(r"local directory: http://127.0.0.1:(\d+)", "\n".join(lines))
        assert directory_port is not None
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/docs") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{directory_port.group(1)}/") as r:
                assert r.status == 200
        rest = await interrupt(process)

    output = "\n".join(lines) + rest
    assert process.returncode == 0, output
    assert "completed: 3 created, 0 failed" in output
    assert f"http://127.0.0.1:{port}/docs" in output and f"ws://127.0.0.1:{port}/ws" in output
    # The hint runs as printed outside the venv too: it names the demo's own interpreter.
    assert f"upload:     {shlex.quote(sys.executable)} -m service upload FILE" in output
    pids = [int(p) for p in re.findall(r"started the .* \(pid (\d+)\)", output)]
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids)
    assert output.count("(exit status 0)") == 2


async def test_the_demo_will_not_start_on_a_port_another_program_listens_on(
    tmp_path: Path,
) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        async with running_demo(tmp_path, port) as process, asyncio.timeout(30):
            output, _ = await process.communicate()

    assert process.returncode == 1
    assert f"port {port} is in use by another program" in output.decode()
    assert "started the" not in output.decode()


async def test_a_demo_whose_upload_failed_exits_with_the_uploads_status(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.csv")
    async with running_demo(tmp_path, free_port(), "--file", missing) as process:
        lines = await lines_until_ctrl_c(process)
        await interrupt(process)

    output = "\n".join(lines)
    assert "the upload ended with exit status 2" in output
    assert "<batch_id above>" not in output and "/batch/<batch_id>/ws" in output
    assert process.returncode == 2


async def test_a_demo_stopped_before_its_upload_ended_exits_130(tmp_path: Path) -> None:
    async with running_demo(tmp_path, free_port(), "--create-delay", "60") as process:
        assert process.stdout is not None
        async with asyncio.timeout(40):
            while b"local directory: http" not in await process.stdout.readline():
                pass
        rest = await interrupt(process)

    assert process.returncode == 130, rest
    assert f"unfinished in {tmp_path / 'demo.db'} fails at the next demo" in rest
    assert rest.count("(exit status 0)") == 2  # both children stopped cleanly


async def test_the_rate_and_eta_keep_to_the_pace_the_service_keeps(
    service_factory: ServiceFactory,
) -> None:
    # A paced file's first window leaves at once: the rate read 160 rows/min, and the ETA
    # a seventh of the time left, where the directory allows 30 a minute.
    async with service_factory(creates_per_minute=30) as service:
        pace = await ServiceApi(service.http, URL(service.url)).creates_per_minute()
    assert pace == 30
    watch = Watch(Captured().out, creates_per_minute=pace)
    watch.show({"progress": progress_numbers(done=0, total=90)})
    task = watch.progress.tasks[0]
    task.start_time = task.get_time() - 10  # 30 rows done in 10 s: 180 a minute so far
    watch.show({"progress": progress_numbers(done=30, total=90)})

    assert watch.rate.render(task).plain == "30.0 rows/min"
    assert watch.eta.render(task).plain == "ETA 0:02:00"  # 60 left at 30 a minute


@pytest.mark.parametrize("terminal", [True, False], ids=["bar", "lines"])
def test_a_wait_shown_aside_is_taken_back_once_the_service_no_longer_says_it(
    terminal: bool,
) -> None:
    captured = Captured(terminal=terminal)
    held = "Processing hospital 30/35; the directory's rate limit holds the next creates for 3 s"
    with Watch(captured.out) as watch:
        watch.show({"progress": progress_numbers(done=30, total=35)})
        watch.aside(held)
        watch.aside("Processing hospital 30/35")  # the wait is over, no event yet
        aside = watch.progress.tasks[0].fields["aside"]

    if terminal:
        assert aside == ""
    else:
        assert captured.stdout.splitlines()[-1].endswith(" - Processing hospital 30/35")


def progress_numbers(done: int, total: int) -> dict[str, Any]:
    return {
        "processed_hospitals": done,
        "total_hospitals": total,
        "processing_status": "processing",
        "failed_hospitals": 0,
        "current_message": f"Processing hospital {done}/{total}",
    }


@contextlib.asynccontextmanager
async def a_web_page_for_every_path(status: int = 200) -> AsyncIterator[str]:
    """What a wrong --url often reaches: a server that answers any request with a page;
    or with an error `status`, a proxy in front of the service (a 502, a 413)."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(status=status, text="<html>welcome</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    async with serving(app) as url:
        yield url


async def test_a_url_that_is_not_the_service_exits_2_and_says_so(sample: Path) -> None:
    batch_id = str(uuid.uuid4())
    async with a_web_page_for_every_path() as url:
        for argv in (
            ["upload", str(sample)],
            ["resume", batch_id],
            ["rollback", batch_id],
            ["results", batch_id],
        ):
            captured = Captured()
            assert await client(captured, *argv, "--url", url) == 2, argv
            assert f"is {url} the service's address?" in captured.stderr, argv
            assert captured.stdout == "", argv  # not the page, as if it were the results


async def test_the_directory_s_own_json_404_is_not_taken_for_the_service_s(
    directory: RunningDirectory, sample: Path
) -> None:
    # Both are set as URLs: the directory answers the service's paths with its JSON 404.
    captured = Captured()
    assert await client(captured, "upload", str(sample), "--url", directory.url) == 2
    assert "HTTP 404" in captured.stderr and "Not Found" in captured.stderr
    assert f"is {directory.url} the service's address?" in captured.stderr


async def test_another_program_s_json_refusal_is_not_taken_for_the_service_s(
    sample: Path,
) -> None:
    # Every answer of the service carries X-Request-ID: a JSON refusal without it is another
    # program's, whatever it says.
    async def other(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"detail": "Method Not Allowed"}, status=405)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", other)
    captured = Captured()
    async with serving(app) as url:
        assert await client(captured, "upload", str(sample), "--url", url) == 2

    assert "HTTP 405" in captured.stderr
    assert f"is {url} the service's address?" in captured.stderr


async def test_a_wrong_prefix_in_the_url_is_said_to_be_one(service: Service, sample: Path) -> None:
    # The service's own 404 for a path it does not serve, not one for an unknown batch.
    url = f"{service.url}/loader"
    captured = Captured()
    assert await client(captured, "upload", str(sample), "--url", url) == 2
    assert f"is {url} the service's address?" in captured.stderr


async def test_a_proxy_s_error_page_is_said_to_be_a_proxy_s(sample: Path) -> None:
    # Its 502, 503, 504 or 413 page got "is URL the service's address?", with URL right.
    for status, says in [
        (413, "a proxy or gateway in front of the service answered (HTTP 413)"),
        (502, "a proxy or gateway in front of the service answered (HTTP 502)"),
        (404, "the service's address?"),
    ]:
        async with a_web_page_for_every_path(status) as url:
            captured = Captured()
            assert await client(captured, "upload", str(sample), "--url", url) == 2
        assert says in captured.stderr, (status, captured.stderr)
        assert f"HTTP {status}" in captured.stderr


@contextlib.asynccontextmanager
async def a_proxy_that_loses_the_answer(service: Service) -> AsyncIterator[str]:
    """A proxy that hands each request to the service, then answers 504 with its own page,
    as one whose wait for the service ran out does."""

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        url = service.url + request.path
        async with service.http.post(url, data=await request.read(), headers=headers) as r:
            await r.read()
        return web.Response(
            status=504, text="<html>504 Gateway Time-out</html>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_post("/{tail:.*}", forward)
    async with serving(app) as url:
        yield url


async def test_an_upload_whose_answer_was_lost_says_it_may_have_been_accepted(
    service: Service, sample: Path
) -> None:
    # Uploaded again as if refused, it would load every hospital twice.
    async with a_proxy_that_loses_the_answer(service) as url:
        plain, keyed = Captured(), Captured()
        assert await client(plain, "upload", str(sample), "--url", url) == 2
        key = ["--idempotency-key", "nightly-load"]
        assert await client(keyed, "upload", str(sample), "--url", url, *key) == 2

    assert "HTTP 504" in plain.stderr
    assert "was refused" not in plain.stderr  # not refused: it reached the service
    assert "may have been accepted all the same: look for it in GET /batch" in plain.stderr
    assert "upload it again with the same --idempotency-key" in keyed.stderr
    _, listing = await service.get("/batch")
    assert len(listing["batches"]) == 2  # both reached the service
    again = Captured()  # the retry the message advises: the batch it made, nothing new
    assert await client(again, "upload", str(sample), "--url", service.url, *key) == 0
    _, listing = await service.get("/batch")
    assert len(listing["batches"]) == 2


async def test_an_upload_answered_with_the_service_s_own_500_may_have_been_accepted(
    sample: Path,
) -> None:
    # A 500 is the service's own answer to an error it did not foresee, which may come
    # after the batch was stored: as unclear as a proxy's 504.
    async def failing(request: web.Request) -> web.Response:
        await request.read()
        detail = {"detail": "Internal server error (request id r-1)"}
        return web.json_response(detail, status=500, headers={"X-Request-ID": "r-1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", failing)
    captured = Captured()
    async with serving(app) as url:
        assert await client(captured, "upload", str(sample), "--url", url) == 2

    assert "got no clear answer (HTTP 500)" in captured.stderr
    assert "may have been accepted all the same" in captured.stderr


@contextlib.asynccontextmanager
async def a_server_that_never_answers() -> AsyncIterator[str]:
    """What a hung service, or a proxy that holds requests (a websocket upgrade it buffers),
    looks like: a connection accepted, and no answer to anything."""
    released = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        await released.wait()
        return web.Response(status=504)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hold)
    async with serving(app) as url:
        try:
            yield url
        finally:
            released.set()


async def test_a_service_that_never_answers_is_one_line_and_exit_2(
    sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp's 5 minutes, shortened; what ends them is a TimeoutError, not a ClientError.
    monkeypatch.setattr("aiohttp.client.DEFAULT_TIMEOUT", aiohttp.ClientTimeout(total=0.3))
    batch_id = str(uuid.uuid4())
    async with a_server_that_never_answers() as url:
        for argv in (["upload", str(sample)], ["resume", batch_id], ["results", batch_id]):
            captured = Captured()
            assert await client(captured, *argv, "--url", url) == 2, argv
            assert f"no answer from the service at {url} within 0.3 s" in captured.stderr, argv
            assert captured.stdout == "", argv


async def test_a_connect_timeout_is_unreachable_not_an_upload_that_may_have_been_accepted(
    sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host that drops the SYN (a firewall; here a full accept queue): aiohttp's
    # ConnectionTimeoutError after sock_connect. Nothing was sent, yet the upload read
    # "lost the answer ... may have been accepted all the same".
    timeout = aiohttp.ClientTimeout(total=10, sock_connect=0.3)
    monkeypatch.setattr("aiohttp.client.DEFAULT_TIMEOUT", timeout)
    with socket.socket() as listener, contextlib.ExitStack() as queued:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(3):  # fill the accept queue, which is never drained
            waiting = queued.enter_context(socket.socket())
            waiting.setblocking(False)
            waiting.connect_ex(listener.getsockname())
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        captured = Captured()
        assert await client(captured, "upload", str(sample), "--url", url) == 2

    assert f"cannot reach the service at {url}" in captured.stderr
    assert "may have been accepted" not in captured.stderr


async def test_a_websocket_upgrade_nobody_answers_ends_at_the_reconnect_timeout() -> None:
    # The /health call that sets the display's pace waits no longer either (it took 5 s).
    loop = asyncio.get_running_loop()
    async with a_server_that_never_answers() as url:
        captured, started = Captured(), loop.time()
        async with asyncio.timeout(10):  # not aiohttp's 5 minutes a handshake
            status = await client(
                captured, "follow", str(uuid.uuid4()), "--url", url, "--reconnect-timeout", "0.5"
            )

    assert status == 3, captured.stderr
    assert "no answer to the websocket handshake within 0.5s" in captured.stderr
    assert loop.time() - started < 3


async def test_a_handshake_nobody_answers_after_sockets_cut_at_once_takes_what_is_left() -> None:
    # The patience counts from when contact was lost, the handshake's wait included: each
    # handshake waited the whole of it again, and the follow gave up that much later.
    loop = asyncio.get_running_loop()
    released, opened = asyncio.Event(), []

    async def cut_then_hold(request: web.Request) -> web.StreamResponse:
        opened.append(request)
        if len(opened) > 3:
            await released.wait()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/batch/{batch_id}/ws", cut_then_hold)
    async with serving(app) as url:
        captured, started = Captured(), loop.time()
        try:
            async with asyncio.timeout(10):
                status = await client(
                    captured, "follow", str(uuid.uuid4()), "--url", url, "--reconnect-timeout", "3"
                )
        finally:
            released.set()
        took = loop.time() - started

    assert status == 3, captured.stderr
    assert len(opened) == 4  # three cut after 0.2, 0.4 and 0.8 s, then one held
    waited = re.search(r"no answer to the websocket handshake within ([0-9.]+)s", captured.stderr)
    assert waited is not None, captured.stderr
    assert float(waited.group(1)) < 2.0  # what was left of the 3 s, not 3 s again
    assert took >= 2.9


async def test_an_empty_idempotency_key_is_sent_not_dropped(service: Service, sample: Path) -> None:
    captured = Captured()
    status = await client(
        captured, "upload", str(sample), "--url", service.url, "--idempotency-key", ""
    )

    assert status == 2  # the service refuses it; a retry must not make a second batch
    assert "Idempotency-Key must be 1 to 255 characters" in captured.stderr


async def test_an_idempotency_key_with_a_line_break_is_a_usage_error(
    sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        await client(Captured(), "upload", str(sample), "--idempotency-key", "a\nb")

    assert exited.value.code == 2
    assert "without line breaks" in capsys.readouterr().err


async def test_on_a_terminal_a_batch_that_failed_says_why_at_the_end(
    service: Service, directory: RunningDirectory, sample: Path
) -> None:
    directory.standin.add_fault("batch_activate", "503")
    captured = Captured(terminal=True)
    status = await client(captured, "upload", str(sample), "--url", service.url, "--follow")

    assert status == 1
    assert "Activation failed" in captured.stdout  # the bar shows no message: the end must


async def test_results_into_a_reader_that_leaves_exits_141(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(0.0)
    accepted = await service.upload(csv_of(1000, prefix="Hospital " + "x" * 100))
    await service.wait_finished(accepted["batch_id"])
    status, stdout, stderr = await into_head("results", accepted["batch_id"], "--url", service.url)

    assert stdout.startswith(b"row,name,address,phone,status")
    assert status == 141, stderr.decode()


async def test_results_on_a_terminal_show_a_value_s_escape_sequence_as_text(
    service: Service,
) -> None:
    accepted = await service.upload("name,address,phone\nEvil\x1b[2JHospital,1 Main St,\n")
    await service.wait_finished(accepted["batch_id"])
    argv = ["results", accepted["batch_id"], "--url", service.url]
    terminal, screen = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "service", *argv), stdout=screen, cwd=PROJECT
        )
    finally:
        os.close(screen)
    try:
        async with asyncio.timeout(20):
            await process.wait()
        shown = os.read(terminal, 65536)
    finally:
        os.close(terminal)

    assert process.returncode == 0
    assert b"Evil\\x1b[2JHospital" in shown and b"\x1b" not in shown


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["results", "follow", "events"])
async def test_output_that_cannot_be_written_is_one_line_and_exit_2(
    service: Service, command: str
) -> None:
    batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
    await service.wait_finished(batch_id)
    if command == "events":  # read from the database itself
        argv, env = ["events", "--batch", batch_id], {"DATABASE_PATH": service.db_path}
    else:
        argv, env = [command, batch_id, "--url", service.url], {}
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails: no space left on device
    try:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "service", *argv),
            stdout=full,
            stderr=asyncio.subprocess.PIPE,
            cwd=PROJECT,
            # Buffered, as from a shell: the last writes fail only when stdout is flushed.
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | env,
        )
    finally:
        os.close(full)
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()

    assert process.returncode == 2, stderr.decode()
    assert stderr.decode() == "error: cannot write the output: No space left on device\n"


def test_an_error_naming_a_file_is_not_reported_as_the_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The demo's database folder on a full disk is not the output that cannot be written.
    def full_disk(argv: list[str]) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/data")

    monkeypatch.setattr("service.demo.main", full_disk)
    with pytest.raises(OSError, match="/full/data"):
        main(["demo"])


def test_a_command_started_with_its_output_closed_exits_with_its_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `events >&-`: Python leaves sys.stdout None, and flushing it was an AttributeError.
    monkeypatch.setattr("service.demo.main", lambda argv: 0)
    monkeypatch.setattr(sys, "stdout", None)

    assert main(["demo"]) == 0


def test_ctrl_c_in_the_last_flush_exits_130_without_flushing_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `events | less`, Ctrl-C: the flush into the full pipe is interrupted, and the one at
    # exit would block again, then end in 120 once the reader left.
    class Blocked(io.StringIO):
        def flush(self) -> None:
            raise KeyboardInterrupt

    redirected = []
    monkeypatch.setattr("service.demo.main", lambda argv: 0)
    monkeypatch.setattr(sys, "stdout", Blocked())
    monkeypatch.setattr("service.__main__._stdout_to_devnull", lambda: redirected.append(1))

    assert main(["demo"]) == 130
    assert redirected == [1]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO])
def test_every_output_error_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: int
) -> None:
    # A full disk or quota, a file too large, a failing device: /dev/full gives ENOSPC only.
    def unwritable(argv: list[str]) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("service.demo.main", unwritable)
    monkeypatch.setattr("service.__main__._stdout_to_devnull", lambda: None)  # not pytest's

    assert main(["demo"]) == 2
    assert capsys.readouterr().err == f"error: cannot write the output: {os.strerror(code)}\n"


@pytest.mark.parametrize("terminal", [False, True])
async def test_a_refused_rollback_of_a_completed_batch_says_why(
    service: Service, directory: RunningDirectory, terminal: bool
) -> None:
    # An activated batch stays `completed` when the directory refuses a delete: the exit
    # status was 1 and neither the lines nor the end said why, or what to do.
    accepted = await service.upload(SAMPLE_CSV)
    batch_id = accepted["batch_id"]
    await service.wait_finished(batch_id)
    directory.standin.add_fault("batch_delete", "503")
    captured = Captured(terminal=terminal)
    status = await client(captured, "rollback", batch_id, "--url", service.url, "--follow")

    assert status == 1
    assert "Rollback failed: the directory did not delete upstream batch" in captured.stdout
    assert "roll back again to retry" in captured.stdout


async def finished_batch(
    service: Service, rows: list[tuple[str, str]], failed: tuple[int, ...] = ()
) -> str:
    """The id of a batch written straight to the log: its rows (name, address) created,
    but those numbered in `failed`, and activated when none failed."""
    batch_id, numbers = str(uuid.uuid4()), tuple(range(1, len(rows) + 1))
    created = ev.BatchCreated(
        batch_id=batch_id,
        file_name="long.csv",
        rows=tuple(ev.Row(n, *row, None, n + 1) for n, row in zip(numbers, rows, strict=True)),
        upstream_batches=(ev.UpstreamBatch(batch_id, numbers),),
    )
    outcomes = [
        ev.HospitalFailed(n, "rejected", "refused by the directory", False)
        if n in failed
        else ev.HospitalCreated(n, 100 + n)
        for n in numbers
    ]
    events: list[ev.Event] = [created, ev.HospitalRequested(numbers, (1,) * len(rows)), *outcomes]
    if not failed:
        events.append(ev.BatchActivated(len(rows), (batch_id,)))
    await service.app[STORE].append(b.stream_id(batch_id), -1, [NewEvent(e) for e in events])
    return batch_id


async def test_a_follow_stopped_says_how_to_follow_again_on_one_line(service: Service) -> None:
    batch_id = str(uuid.uuid4())  # created and never worked on: the follow never ends
    await service.app[STORE].append(b.stream_id(batch_id), -1, new_batch(batch_id))
    captured = Captured(terminal=True, width=60)  # narrower than the command
    following = asyncio.ensure_future(client(captured, "follow", batch_id, "--url", service.url))
    await asyncio.sleep(0.5)
    following.cancel()
    with pytest.raises(asyncio.CancelledError):
        await following

    text = plain(captured.stdout)
    command = f"python -m service follow {batch_id} --url {service.url}"
    assert "Stopped following batch" in text
    assert any(command in line for line in text.splitlines()), text


def plain(text: str) -> str:
    """A terminal's output without its colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


async def test_a_batch_whose_status_passes_4_mib_is_followed_to_its_end(
    service: Service,
) -> None:
    # The snapshot and `finished` messages carry the whole /status: 20 rows of 110,000
    # characters pass aiohttp's default limit of 4 MiB a message (as 9,000 rows with
    # 400-character addresses do), which the client closed with 1009 and retried forever.
    long = "x" * 110_000
    batch_id = await finished_batch(
        service, [(f"Hospital {n} {long}", f"{n} {long}") for n in range(1, 21)]
    )
    captured = Captured()
    async with asyncio.timeout(15):
        status = await client(
            captured, "follow", batch_id, "--url", service.url, "--reconnect-timeout", "2"
        )

    assert status == 0, captured.stdout + captured.stderr
    assert "code 1009" not in captured.stdout
    assert "completed: 20 created, 0 failed" in captured.stdout


@pytest.mark.parametrize("output", [False, True], ids=["follow", "results-o"])
async def test_output_in_an_encoding_without_a_name_s_letters_shows_them_as_escapes(
    service: Service, tmp_path: Path, output: bool
) -> None:
    # PYTHONIOENCODING=latin-1: a UnicodeEncodeError traceback and exit 1 ("failed").
    batch_id = await finished_batch(service, [("東京病院", "1 Main St")])
    saved = tmp_path / "results.csv"
    argv = ["results", batch_id, "-o", str(saved)] if output else ["follow", batch_id]
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "service", *argv, "--url", service.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=PROJECT,
        env=os.environ | {"PYTHONIOENCODING": "latin-1"},
    )
    async with asyncio.timeout(20):
        stdout, stderr = await process.communicate()

    assert process.returncode == 0, stderr.decode()
    if output:  # the file is UTF-8, byte for byte what the service sent
        async with service.http.get(f"{service.url}/batch/{batch_id}/results.csv") as r:
            assert saved.read_bytes() == await r.read()
        assert "東京病院" in saved.read_text(encoding="utf-8")
    else:
        assert b"\\u6771\\u4eac\\u75c5\\u9662" in stdout
        assert b"completed: 1 created, 0 failed" in stdout


async def test_a_long_batch_lists_its_failed_rows_and_says_where_the_rest_are(
    service: Service,
) -> None:
    # 20,000 rows took the client 9 s and 180 MB to lay out, for a table nobody reads.
    total = TABLE_ROWS + 1
    rows = [(f"Hospital {n}", f"{n} Main St") for n in range(1, total + 1)]
    batch_id = await finished_batch(service, rows, failed=(2, 500))
    captured = Captured(terminal=True, width=100)  # narrower than the line
    status = await client(captured, "follow", batch_id, "--url", service.url)

    assert status == 1
    text = plain(captured.stdout)
    listed = re.findall(r"Hospital (\d+) ", text)
    assert listed == ["2", "500"]
    assert f"{total - 2} of the {total} rows are not listed here." in text
    # On one line: a command broken over lines does not run as pasted (its first line,
    # `python -m service`, alone would start a service).
    command = f"python -m service results {batch_id} --url {service.url} -o results.csv"
    assert any(command in line for line in text.splitlines()), text[-600:]
    assert "partially_completed: 999 created, 2 failed" in text


async def test_a_long_batch_with_no_failed_row_prints_no_table(service: Service) -> None:
    total = TABLE_ROWS + 1
    rows = [(f"Hospital {n}", f"{n} Main St") for n in range(1, total + 1)]
    batch_id = await finished_batch(service, rows)
    captured = Captured()
    status = await client(captured, "follow", batch_id, "--url", service.url)

    assert status == 0, captured.stderr
    assert "Hospital ID" not in captured.stdout  # no table's header, with no row under it
    assert f"{total} of the {total} rows are not listed here." in captured.stdout
    assert f"completed: {total} created, 0 failed" in captured.stdout


# What a hostile server (or a proxy) could send to draw on the user's terminal: a window title,
# a full reset, and markup that rich would read as a closing tag.
HOSTILE = "\x1b]0;PWNED\x07\x1bc[/x]"
SHOWN_HOSTILE = "\\x1b]0;PWNED\\x07\\x1bc[/x]"


@contextlib.asynccontextmanager
async def a_hostile_service(
    answer: dict[str, Any], messages: list[Any], health: Any = None
) -> AsyncIterator[str]:
    """A server that answers an upload, a rollback and /progress with `answer` merged into a
    well-formed body, /health with `health` as its `directory`, and a batch's websocket
    with `messages` (each sent as JSON, a str as it is), then a close."""

    def body(request: web.Request) -> dict[str, Any]:
        batch_id = request.match_info.get("batch_id", str(uuid.uuid4()))
        return {"batch_id": batch_id, "total_hospitals": 1, "warnings": []} | {
            "current_message": "ok",
            **answer,
        }

    async def json_answer(request: web.Request) -> web.Response:
        return web.json_response(body(request), headers={"X-Request-ID": "x"})

    async def health_answer(request: web.Request) -> web.Response:
        return web.json_response({"directory": health}, headers={"X-Request-ID": "x"})

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for message in messages:
            await ws.send_str(message if isinstance(message, str) else json.dumps(message))
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_post("/batch/upload-csv", json_answer)
    app.router.add_delete("/batch/{batch_id}", json_answer)
    app.router.add_get("/batch/{batch_id}/progress", json_answer)
    app.router.add_get("/health", health_answer)
    app.router.add_get("/batch/{batch_id}/ws", socket)
    async with serving(app) as url:
        yield url


def finished_with(status: dict[str, Any], version: int = 9) -> dict[str, Any]:
    return {"type": "finished", "version": version, "progress": {}, "status": status}


async def test_what_a_hostile_service_sends_is_shown_as_text_without_a_traceback(
    sample: Path,
) -> None:
    # Each was written to the terminal as it came (a retitled window, a reset screen) or
    # read as rich markup, which ended the client in a MarkupError traceback.
    row = {"row": HOSTILE, "name": "n", "address": "a", "phone": None}
    snapshot = {
        "type": "snapshot",
        "version": 1,
        "progress": progress_numbers(0, 1) | {"processing_status": HOSTILE},
    }
    final = {"batch_id": HOSTILE, "processing_status": HOSTILE, "hospitals": [row]}
    row |= {"status": HOSTILE, "hospital_id": HOSTILE, "error_message": None}
    batch_id = str(uuid.uuid4())
    cases: list[tuple[list[str], dict[str, Any], list[Any], int, str]] = [
        (["upload", str(sample)], {"batch_id": HOSTILE}, [], 2, "batch_id is not a batch id"),
        (["upload", str(sample)], {"total_hospitals": HOSTILE}, [], 0, SHOWN_HOSTILE),
        (["rollback", batch_id], {"current_message": HOSTILE}, [], 0, SHOWN_HOSTILE),
        (["follow", batch_id], {}, [snapshot, finished_with(final)], 1, f"Batch {SHOWN_HOSTILE}"),
    ]
    for terminal in (False, True):
        for argv, answer, messages, expected, says in cases:
            async with a_hostile_service(answer, messages) as url:
                captured = Captured(terminal=terminal)
                status = await client(captured, *argv, "--url", url)
            shown = plain(captured.stdout + captured.stderr)
            assert (status, says in shown) == (expected, True), (argv, shown[-800:])
            assert "\x1b]" not in shown and "\x1bc" not in shown, (argv, shown[-800:])


async def test_fields_of_another_type_are_skipped_or_shown_as_unknown_without_a_traceback() -> None:
    # A proxy's or a hostile server's answers: a progress that is a list, a version that
    # is an object, counts and times that are strings or past any float, rows that are not
    # objects, a pace past any float. Each was a traceback and exit 1 ("failed").
    huge = 10**400
    skipped = [
        {"type": "snapshot", "version": 1, "progress": [1]},
        {"type": "snapshot", "version": {"a": 1}, "progress": {}},
        {"type": "finished", "version": 2, "progress": {}, "status": [1]},
    ]
    odd = {
        "type": "event",
        "version": 3,
        "progress": {
            "processed_hospitals": "5",
            "total_hospitals": huge,
            "failed_hospitals": [0],
            "processing_status": 7,
            "current_message": {"text": "x"},
        },
    }
    final = {
        "processing_status": "completed",
        "processed_hospitals": 1,
        "failed_hospitals": 0,
        "total_hospitals": "1",
        "processing_time_seconds": "soon",
        "hospitals": ["row", {"row": 1, "status": 5}],
    }
    for directory in ([30], {"creates_per_minute": huge}):
        async with a_hostile_service(
            {}, [*skipped, odd, finished_with(final, 4)], directory
        ) as url:
            for terminal in (False, True):
                captured = Captured(terminal=terminal)
                status = await client(captured, "follow", str(uuid.uuid4()), "--url", url)
                shown = plain(captured.stdout + captured.stderr)
                assert status == 0, shown[-1500:]
                assert "completed: 1 created, 0 failed, 0 deleted of ?; activated: ?; ? s" in shown


async def test_an_answer_that_never_ends_is_refused_once_past_the_limit(
    sample: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that streams without end (another program at --url, or a hostile one) took
    # the client 1.4 GB of memory in 6 s, until aiohttp's total timeout of 5 minutes.
    monkeypatch.setattr("service.client.api.MAX_ANSWER", 2**20, raising=False)
    monkeypatch.setattr("aiohttp.client.DEFAULT_TIMEOUT", aiohttp.ClientTimeout(total=3))

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"current_message": "')
        while True:
            await response.write(b"a" * 2**16)
            await asyncio.sleep(0.01)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", endless)
    async with serving(app) as url:
        for argv in (["upload", str(sample)], ["rollback", str(uuid.uuid4())]):
            captured = Captured()
            async with asyncio.timeout(10):
                assert await client(captured, *argv, "--url", url) == 2, argv
            assert f"with an answer past {2**20} bytes" in captured.stderr, argv


async def test_the_count_beside_the_rows_left_out_is_shown_as_text(sample: Path) -> None:
    # The line that says where the rows a long table leaves out are named the total the
    # service sent as rich markup, with its control characters: a MarkupError traceback
    # once the batch had ended (a row that is not an object is left out too).
    final = {"processing_status": "completed", "total_hospitals": HOSTILE, "hospitals": ["x"]}
    for terminal in (False, True):
        async with a_hostile_service({}, [finished_with(final)]) as url:
            captured = Captured(terminal=terminal)
            status = await client(captured, "follow", str(uuid.uuid4()), "--url", url)
        shown = plain(captured.stdout + captured.stderr)
        assert (status, f"1 of the {SHOWN_HOSTILE} rows" in shown) == (0, True), shown[-800:]
        assert "\x1b]" not in shown and "\x1bc" not in shown, shown[-800:]


async def test_a_command_printed_to_paste_keeps_the_url_as_given(
    service: Service, sample: Path
) -> None:
    # --url went into the printed command as rich markup: an IPv6 host that starts with a
    # letter ("http://[fd00::2]:8000", a unique local or link-local address) or brackets in
    # its query lost their text, and "[/x]" ended a done upload in a MarkupError traceback.
    for url in (f"{service.url}/?via=[fd00::2]", f"{service.url}/?via=[/x]"):
        captured = Captured()
        status = await client(captured, "upload", str(sample), "--url", url)
        assert status == 0, captured.stderr
        assert f" --url {url}" in captured.stdout, captured.stdout


async def test_an_upload_answered_with_an_earlier_batch_of_its_key_says_so(
    service: Service, sample: Path
) -> None:
    # The service marks the answer (Idempotent-Replayed, and its message), but the client
    # said "accepted" as for a new batch: a batch since rolled back then read as a new
    # upload that was rolled back again, with no word that a new key loads the file again.
    key = ["--idempotency-key", "cli-replay"]
    first, second = Captured(), Captured()
    assert await client(first, "upload", str(sample), "--url", service.url, *key) == 0
    assert await client(second, "upload", str(sample), "--url", service.url, *key) == 0

    assert "before" not in first.stdout
    assert "uploaded with this --idempotency-key before" in second.stdout, second.stdout
    assert "a new key loads the file again" in second.stdout
