"""The service as a process: it says when it listens and when it stopped; one that cannot
start on its database says why, exits 2, and leaves nothing running."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from service.__main__ import _open_files_to_hard_limit
from service.local_directory import RunningDirectory
from service.projections import batches
from service.store.event_store import EventStore, check_writable
from service.store.migrations import migrate
from tests.integration.conftest import new_batch
from tests.support import PROJECT, SAMPLE_CSV, ServiceProcess, csv_of, form, free_port

PAGE = 4096


async def three_creates_in_flight(
    directory: RunningDirectory, tmp_path: Path, shutdown_timeout: float
) -> ServiceProcess:
    """A service process logging at INFO, SAMPLE_CSV's three creates held by the directory."""
    directory.standin.set_delay(10.0)
    service = ServiceProcess(
        tmp_path / "service.db",
        directory.url,
        LOG_LEVEL="INFO",
        APP_SHUTDOWN_TIMEOUT=str(shutdown_timeout),
    )
    async with aiohttp.ClientSession() as http:
        await service.start(http)
        async with http.post(f"{service.url}/batch/upload-csv", data=form(SAMPLE_CSV)) as r:
            assert r.status == 202
        while directory.standin.request_counts["create"] < 3:
            await asyncio.sleep(0.05)
    return service


async def an_answer_not_read(service: ServiceProcess) -> asyncio.StreamWriter:
    """A request the stop waits for: the first event of an 8 MB upload, asked for by a
    client that reads none of it, so that its handler waits to write the rest."""
    async with aiohttp.ClientSession() as http:
        big = aiohttp.FormData()
        big.add_field(
            "file", io.BytesIO(csv_of(400, prefix="N" * 20_000).encode()), filename="a.csv"
        )
        async with http.post(f"{service.url}/batch/upload-csv", data=big) as r:
            assert r.status == 202
            batch_id = (await r.json())["batch_id"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", service.port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /batch/{batch_id}/events?limit=1 HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.5)  # its handler is under way, writing
    return writer


async def test_the_log_says_when_the_service_listens_and_when_it_stopped(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    service = await three_creates_in_flight(directory, tmp_path, shutdown_timeout=0.5)
    await service.stop()
    said = service.log.read_text()

    assert service.process is not None and service.process.returncode == 0
    assert f"listening on http://127.0.0.1:{service.port}" in said
    assert "stopping: no new row is sent; calls in flight get up to 0.5 s" in said
    cut_off = r"stopping: \d+ task\(s\) still under way after 0\.5 s are cut off"
    assert re.search(rf"{cut_off} \(creates in flight: 3 of batch [0-9a-f-]{{36}}\)", said)
    assert said.rstrip().endswith("stopped")


async def test_the_access_log_leaves_out_healthy_probes(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    service = ServiceProcess(tmp_path / "service.db", directory.url, LOG_LEVEL="INFO")
    async with aiohttp.ClientSession() as http:
        await service.start(http)  # probes /health until it answers 200
        for path in ("/health", "/batch", "/batch/nope/status"):
            async with http.get(f"{service.url}{path}") as r:
                assert r.status in (200, 404, 422)
        await service.stop()
    said = service.log.read_text()

    assert re.search(r" INFO aiohttp\.access: .*\"GET /batch HTTP/1\.1\" 200 ", said)
    assert re.search(r"\"GET /batch/nope/status HTTP/1\.1\" 4\d\d ", said)
    assert "GET /health" not in said


async def test_a_bulk_request_waiting_at_shutdown_is_answered_202_and_holds_no_one(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    # aiohttp waits up to twice the shutdown timeout for a handler before it stops the
    # processor: a bulk request left waiting held a 10 s stop past docker compose's 30 s, and
    # its client got its connection dropped, no answer.
    directory.standin.set_delay(10.0)
    service = ServiceProcess(tmp_path / "service.db", directory.url, APP_SHUTDOWN_TIMEOUT="2")
    async with aiohttp.ClientSession() as http:
        await service.start(http)

        async def bulk() -> tuple[int, dict[str, object]]:
            async with http.post(f"{service.url}/hospitals/bulk", data=form(SAMPLE_CSV)) as r:
                return r.status, await r.json()

        waiting = asyncio.ensure_future(bulk())
        while directory.standin.request_counts["create"] < 3:  # all three in flight
            await asyncio.sleep(0.05)
        assert service.process is not None
        stopped_at = time.monotonic()
        service.process.terminate()
        async with asyncio.timeout(15):
            status, body = await waiting
            while service.process.poll() is None:
                await asyncio.sleep(0.05)
        took = time.monotonic() - stopped_at

    assert status == 202, body
    assert body["total_hospitals"] == 3
    assert service.process.returncode == 0
    assert took < 5.0  # the processor's 2 s grace, not 2 x 2 s of HTTP drain and then 2 s


async def test_a_request_still_under_way_at_a_stop_lets_no_new_create_start(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    # aiohttp waits up to the shutdown timeout for a request under way (here an answer its
    # client does not read) before it stops the processor: meanwhile it kept sending creates.
    service = ServiceProcess(
        tmp_path / "service.db", directory.url, DIRECTORY_CONCURRENCY="1", APP_SHUTDOWN_TIMEOUT="2"
    )
    counts = directory.standin.request_counts
    async with aiohttp.ClientSession() as http:
        await service.start(http)
    writer = await an_answer_not_read(service)
    assert counts["create"] >= 2  # the upload's rows are being sent
    assert service.process is not None
    stopped_at = time.monotonic()
    service.process.terminate()
    sent = counts["create"]
    async with asyncio.timeout(10):
        while service.process.poll() is None:
            await asyncio.sleep(0.05)
    took = time.monotonic() - stopped_at
    writer.close()

    assert service.process.returncode == 0
    assert took > 1.5  # the stop did wait for the answer under way
    assert counts["create"] <= sent + 1  # the one in flight as the signal came, at most


async def test_an_upload_whose_body_is_still_coming_at_a_stop_is_answered_503_at_once(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    # Once a stop begins, aiohttp reads nothing more from a connection: an upload whose body
    # was still arriving waited for it the whole shutdown timeout, held the stop that long
    # with nothing in flight, and its client got its connection dropped, no answer.
    service = ServiceProcess(tmp_path / "service.db", directory.url, APP_SHUTDOWN_TIMEOUT="8")
    async with aiohttp.ClientSession() as http:
        await service.start(http)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    writer.write(
        b"POST /batch/upload-csv HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\n'
        b"name,address,phone\n"
    )
    await writer.drain()
    await asyncio.sleep(0.3)  # its handler is under way, reading the body
    assert service.process is not None
    stopped_at = time.monotonic()
    service.process.terminate()
    async with asyncio.timeout(20):
        answer = await reader.read()
        answered = time.monotonic() - stopped_at
        while service.process.poll() is None:
            await asyncio.sleep(0.05)
    took = time.monotonic() - stopped_at
    writer.close()

    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"the service is stopping" in answer
    assert answered < 3.0 and took < 3.0  # not the 8 s shutdown timeout
    assert service.process.returncode == 0
    async with aiohttp.ClientSession() as http:  # nothing of it was recorded
        await service.start(http)
        async with http.get(f"{service.url}/batch") as r:
            assert (await r.json())["batches"] == []
    await service.stop()


async def test_a_second_signal_while_stopping_says_so_in_the_log(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    # The second SIGTERM or Ctrl-C ends the wait for creates in flight: the process left
    # with status 1 and not a word in its log.
    service = await three_creates_in_flight(directory, tmp_path, shutdown_timeout=8)
    assert service.process is not None
    service.process.terminate()
    await asyncio.sleep(0.5)
    service.process.send_signal(signal.SIGINT)
    service.process.wait(8)
    said = service.log.read_text()

    assert service.process.returncode == 1
    assert "WARNING __main__: stopped at once by a second signal" in said
    assert "Traceback" not in said


async def test_a_second_signal_while_a_request_is_under_way_exits_at_once(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    # aiohttp's GracefulExit, raised through its wait for a request under way, cut its
    # cleanup off half-way: 3-9 tracebacks of the resources it left open.
    service = await three_creates_in_flight(directory, tmp_path, shutdown_timeout=8)
    assert service.process is not None
    writer = await an_answer_not_read(service)
    service.process.terminate()
    await asyncio.sleep(0.5)  # the stop waits for the answer under way
    assert service.process.poll() is None
    signalled = time.monotonic()
    service.process.send_signal(signal.SIGINT)
    service.process.wait(8)
    took = time.monotonic() - signalled
    writer.close()
    said = service.log.read_text()

    assert service.process.returncode == 1
    assert took < 2  # not the 8 s the request and the creates in flight were given
    assert said.rstrip().endswith(
        "WARNING __main__: stopped at once by a second signal: work under way was cut off; "
        "the next start takes it up from the log"
    )
    assert "Traceback" not in said and " ERROR " not in said


async def sent_to_a_child(
    directory: RunningDirectory, tmp_path: Path, request: bytes
) -> tuple[bytes, str]:
    """Send raw bytes to a service run as a child at INFO, read until it closes the
    connection, stop it; (the answer, the child's log)."""
    service = ServiceProcess(tmp_path / "service.db", directory.url, LOG_LEVEL="INFO")
    async with aiohttp.ClientSession() as http:
        await service.start(http)
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        await service.stop()
    return answer, service.log.read_text()


async def test_a_request_the_http_parser_refuses_is_one_info_line_not_an_error(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    answer, said = await sent_to_a_child(
        directory, tmp_path, b"GET /health HTTP/1.1\r\nHost: test\r\nX-Bad: a\x01b\r\n\r\n"
    )

    assert re.match(rb"HTTP/1\.[01] 400 ", answer)
    assert re.search(
        r" INFO aiohttp\.server: Error handling request from .*: HTTP 400, Invalid header value"
        r" char\n",
        said,
    )
    assert " ERROR " not in said and "Traceback" not in said


async def test_a_header_too_long_is_logged_without_its_value(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    # The parser quotes the line's first 100 bytes in its message: a bearer token was logged.
    token = b"Bearer sk_live_" + b"x" * 9000
    answer, said = await sent_to_a_child(
        directory,
        tmp_path,
        b"GET /health HTTP/1.1\r\nHost: test\r\nAuthorization: " + token + b"\r\n\r\n",
    )

    assert re.match(rb"HTTP/1\.[01] 400 ", answer)
    assert re.search(
        r" INFO aiohttp\.server: Error handling request from .*: HTTP 400, Got more than 8190"
        r" bytes when reading\n",
        said,
    )
    assert "sk_live_" not in said


async def test_a_body_that_does_not_decode_is_one_info_line_not_an_error(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    answer, said = await sent_to_a_child(
        directory,
        tmp_path,
        b"POST /batch/upload-csv HTTP/1.1\r\nHost: test\r\nContent-Encoding: gzip\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10\r\n"
        b"Connection: close\r\n\r\n0123456789",
    )

    assert re.match(rb"HTTP/1\.1 400 ", answer)
    assert re.search(r" INFO aiohttp\.server: .*: HTTP 400, Can not decode content-encoding", said)
    assert " ERROR " not in said and "Traceback" not in said


def migrated(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        migrate(conn)


def garbled_past_the_log(db: Path) -> None:
    """The log reads; the read models (the pages after the event tables) do not."""
    migrated(db)
    with db.open("r+b") as f:
        f.seek(6 * PAGE)
        f.write(b"\xab" * 8 * PAGE)


def newer(db: Path) -> None:
    migrated(db)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, '099_future', 'later')")


def newer_event(db: Path) -> None:
    """A pending batch, which the start takes up, whose log holds an event of a version newer
    than the code's: newer code that changed a payload without a migration, or a hand."""

    unfinished(db)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, "
            "schema_version, data, metadata, recorded_at) "
            "VALUES ('e1', 'batch-a', 1, 'HospitalCreated', 9, '{}', '{}', 'later')"
        )


def not_a_database(db: Path) -> None:
    db.write_bytes(b"\x13" * 3 * PAGE)


def refused_start(db: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m service serve` on `db` with `env` (a free port unless given), which must
    exit by itself: its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env={
            "PATH": "/usr/bin:/bin",
            "DATABASE_PATH": str(db),
            "APP_PORT": str(free_port()),
            **env,
        },
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(garbled_past_the_log, "database disk image is malformed", id="corrupt"),
        pytest.param(newer, "newer than this code", id="newer-schema"),
        pytest.param(newer_event, "HospitalCreated v9 is newer than this code", id="newer-event"),
        pytest.param(not_a_database, "file is not a database", id="not-a-database"),
    ],
)
def test_a_database_the_service_cannot_use_is_named_and_it_exits_2(
    tmp_path: Path, make: Callable[[Path], None], says: str
) -> None:
    db = tmp_path / "service.db"
    make(db)

    # A store left open kept its reader threads: the process never ended, even on SIGTERM.
    done = refused_start(db)

    assert done.returncode == 2, done.stderr
    assert f"error: the service could not start: database {db}: " in done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def unfinished(db: Path) -> None:
    """A pending batch, which a start takes up."""

    async def pending() -> None:
        store = EventStore(db, projectors=[batches.project])
        await store.open()
        try:
            await store.append("batch-a", -1, new_batch("a"))
        finally:
            await store.close()

    asyncio.run(pending())


def test_a_port_in_use_is_named_and_it_exits_2_having_taken_up_nothing(tmp_path: Path) -> None:
    # A start that could not listen took up the unfinished batches first: a restart loop
    # appended their intents and withdrawals, and called the directory, on every try.
    db = tmp_path / "service.db"
    unfinished(db)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = refused_start(
            db,
            APP_PORT=str(taken.getsockname()[1]),
            APP_HOST="127.0.0.1",
            DIRECTORY_BASE_URL=f"http://127.0.0.1:{free_port()}",
        )

    assert done.returncode == 2, done.stderr
    assert "address already in use (app.port, APP_PORT: stop what listens there" in done.stderr
    assert "Traceback" not in done.stderr
    assert "recovering batch" not in done.stderr
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)


def test_a_host_that_does_not_resolve_is_named_and_it_exits_2(tmp_path: Path) -> None:
    done = refused_start(tmp_path / "service.db", APP_HOST="no-such-host.invalid")

    assert done.returncode == 2, done.stderr
    assert "could not start: app.host (APP_HOST) 'no-such-host.invalid': " in done.stderr
    assert "Traceback" not in done.stderr


def test_a_database_folder_that_is_a_file_is_named_and_it_exits_2(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file where DATABASE_PATH wants a folder")

    done = refused_start(tmp_path / "data" / "service.db")

    assert done.returncode == 2, done.stderr
    assert (
        f"(database.path, DATABASE_PATH: {tmp_path / 'data'} is a file, not a folder)"
        in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_an_address_not_of_this_machine_is_named_and_it_exits_2(tmp_path: Path) -> None:
    done = refused_start(tmp_path / "service.db", APP_HOST="192.0.2.1")  # TEST-NET-1

    assert done.returncode == 2, done.stderr
    assert "(app.host, APP_HOST: an address of this machine" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_database_that_can_be_read_but_not_written_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "service.db"
    migrated(db)
    with (
        contextlib.closing(sqlite3.connect(db, isolation_level=None)) as writable,
        contextlib.closing(
            sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        ) as read_only,
    ):
        check_writable(writable)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            check_writable(read_only)
        assert not read_only.in_transaction


def open_files(pid: int) -> tuple[int, int]:
    """The soft and hard limits of open files of a process, from /proc."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    soft, hard = re.search(r"Max open files +(\d+) +(\d+)", limits).groups()  # type: ignore[union-attr]
    return int(soft), int(hard)


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc")
async def test_the_service_raises_its_open_files_limit_to_the_hard_one(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    # At a soft limit of 1,024, about 1,000 idle clients made the writer's commits fail.
    service = ServiceProcess(tmp_path / "service.db", directory.url, LOG_LEVEL="INFO")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the child inherits it
    try:
        service.spawn()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert service.process is not None
    try:
        async with aiohttp.ClientSession() as http:
            await service.ready(http)
        limits = open_files(service.process.pid)
    finally:
        await service.stop()

    assert limits == (hard, hard)
    assert f"open files allowed: {hard} (was 256)" in service.log.read_text()


@pytest.mark.parametrize(("limits", "warned"), [((64, 100), True), ((1024, 1024), False)])
def test_a_low_limit_of_open_files_is_named_at_start(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    limits: tuple[int, int],
    warned: bool,
) -> None:
    # Past the limit SQLite says "unable to open database file", which names the wrong
    # culprit: the start says what the limit is, once the soft one is raised to the hard.
    raised: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits)
    monkeypatch.setattr(resource, "setrlimit", lambda _, new: raised.append(new))
    with caplog.at_level(logging.INFO, logger="service.__main__"):
        _open_files_to_hard_limit()

    hard = limits[1]
    assert raised == ([(hard, hard)] if limits[0] != hard else [])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == (
        [
            f"open files allowed: {hard}; each connection takes one, and past "
            "the limit requests fail with 'unable to open database file': raise "
            "it (ulimit -n)"
        ]
        if warned
        else []
    )
