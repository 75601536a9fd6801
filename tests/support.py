"""Running the real service and the local directory on loopback, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from service.app import create_app
from service.local_directory import RunningDirectory
from service.local_directory.storage import Hospital, NewHospital
from service.settings import Settings
from service.store.migrations import migrate
from service.web.keys import PROCESSOR, SETTINGS

PROJECT = Path(__file__).resolve().parents[1]
FINISHED = ("completed", "partially_completed", "failed")
SAMPLE_CSV = (
    "name,address,phone\n"
    "General Hospital,123 Main Street,555-0100\n"
    "City Medical Center,456 Oak Avenue,555-0200\n"
    "Community Hospital,789 Pine Road,\n"
)


def fast_settings(db: Path, directory_url: str, **directory: Any) -> Settings:
    """Settings for tests: quick retries and settling, pacing off unless asked for."""
    defaults: dict[str, Any] = {
        "base_url": directory_url,
        "creates_per_minute": 0,
        "batch_calls_per_minute": 0,
        "settle_seconds": 0.3,
        "backoff_base": 0.05,
        "backoff_max": 0.2,
        "read_timeout": 5.0,
        "connect_timeout": 2.0,
        "rate_window_seconds": 1.0,
        "rate_window_margin": 0.05,
    }
    return Settings().replace(
        app={"shutdown_timeout": 0.5},
        database={"path": str(db)},
        directory={**defaults, **directory},
        api={"bulk_wait_seconds": 10.0},
    )


def csv_of(rows: int, prefix: str = "Hospital") -> str:
    """A valid upload of `rows` distinct hospitals."""
    lines = ["name,address,phone"]
    lines += [f"{prefix} {n},{n} Main Street,555-{n:04d}" for n in range(1, rows + 1)]
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """`app` served on a free loopback port while the block runs: its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def form(content: str | bytes, filename: str = "hospitals.csv") -> aiohttp.FormData:
    """The multipart body curl -F "file=@hospitals.csv" sends."""
    data = aiohttp.FormData()
    data.add_field("file", content, filename=filename, content_type="text/csv")
    return data


@dataclass
class Service:
    url: str
    app: web.Application
    http: aiohttp.ClientSession

    @property
    def db_path(self) -> str:
        """The service's SQLite file."""
        return self.app[SETTINGS].database.path

    async def upload(self, content: str | bytes, **kwargs: Any) -> dict[str, Any]:
        """POST /batch/upload-csv and return the body; asserts it was accepted."""
        async with self.http.post(
            f"{self.url}/batch/upload-csv", data=form(content), **kwargs
        ) as r:
            body = await r.json()
            assert r.status == 202, body
            return dict(body)

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        """GET a path; (status, JSON body)."""
        async with self.http.get(self.url + path, **kwargs) as r:
            return r.status, await r.json()

    async def wait_finished(self, batch_id: str, within: float = 20.0) -> dict[str, Any]:
        """Poll /status until the batch settles; its final body."""
        deadline = time.monotonic() + within
        while True:
            # Idle first, then the body: a body read before the processor went idle can be
            # a finished status that work still followed (an activation failed, then the
            # rollback asked for meanwhile ran).
            idle = await self.idle(batch_id)
            status, body = await self.get(f"/batch/{batch_id}/status")
            assert status == 200, body
            if idle and body["processing_status"] in FINISHED:
                return dict(body)
            assert time.monotonic() < deadline, f"batch did not finish: {body}"
            await asyncio.sleep(0.05)

    async def idle(self, batch_id: str) -> bool:
        """True when the processor has nothing left for this batch."""
        processor = self.app[PROCESSOR]
        try:
            async with asyncio.timeout(0.01):
                await processor.wait_finished(batch_id)
        except TimeoutError:
            return False
        return True


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """The real app on a free loopback port, with an HTTP client for it."""
    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=settings.app.shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            yield Service(f"http://127.0.0.1:{port}", app, http)
    finally:
        await runner.cleanup()


ServiceFactory = Callable[..., contextlib.AbstractAsyncContextManager[Service]]


def free_port(other_than: int = 0) -> int:
    """A loopback port nobody listens on right now; not `other_than`, which the kernel may
    hand out twice running."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != other_than:
            return port


# Every child started, so that one a failed test left running is killed after it.
CHILDREN: list[subprocess.Popen[bytes]] = []


class ServiceProcess:
    """`python -m service serve` as a child process, to be killed like a real crash."""

    def __init__(self, db: Path, directory_url: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "APP_HOST": "127.0.0.1",
            "APP_PORT": str(self.port),
            "DATABASE_PATH": str(db),
            "EXTERNAL_API_BASE_URL": directory_url,
            "LOG_LEVEL": "WARNING",
            "DIRECTORY_CREATES_PER_MINUTE": "0",
            "DIRECTORY_BATCH_CALLS_PER_MINUTE": "0",
            "DIRECTORY_SETTLE_SECONDS": "0.3",
            "DIRECTORY_BACKOFF_BASE": "0.05",
            "DIRECTORY_BACKOFF_MAX": "0.2",
            "DIRECTORY_READ_TIMEOUT": "5",
            **env,
        }
        self.log = db.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start the child; its log goes to a file beside the database."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                env=self.env,
                cwd=PROJECT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        CHILDREN.append(self.process)

    async def start(self, http: aiohttp.ClientSession, within: float = 20.0) -> None:
        """Start the service and wait until /health answers 200."""
        self.spawn()
        await self.ready(http, within)

    async def ready(self, http: aiohttp.ClientSession, within: float = 20.0) -> None:
        """Wait until the spawned service's /health answers 200."""
        assert self.process is not None
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{self.url}/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise AssertionError("the service did not become healthy")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def stop(self) -> None:
        """SIGTERM and wait; kill after 10 s. The wait leaves the loop free: the service may
        be waiting on a directory that this loop serves."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            await asyncio.to_thread(self.process.wait, 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def keyed_batch(db: Path | str, prefix: str = "test") -> tuple[str, str]:
    """A fresh Idempotency-Key and the batch id the service on `db` derives from it, in the
    database's own namespace (a new database is migrated here, which gives it one)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        migrate(conn)
        (namespace,) = conn.execute("SELECT idempotency_namespace FROM instance").fetchone()
    key = f"{prefix}-{uuid.uuid4().hex}"
    return key, str(uuid.uuid5(uuid.UUID(hex=namespace), key))


async def fill_upstream_batch(directory: RunningDirectory, batch_id: str, count: int) -> list[int]:
    """Put `count` other hospitals into a directory batch at once, so ours meets its cap."""
    standin = directory.standin
    delay, jitter = standin.create_delay, standin.jitter
    standin.set_delay(0.0)
    ids = []
    async with aiohttp.ClientSession() as http:
        for n in range(count):
            body = {"name": f"Filler {n}", "address": "x", "creation_batch_id": batch_id}
            async with http.post(f"{directory.url}/hospitals/", json=body) as r:
                assert r.status == 200
                ids.append(int((await r.json())["id"]))
    standin.set_delay(delay, jitter)
    return ids


def creates_entered(directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once a create holds a worker slot (its delay has begun): a moment to wait for
    rather than guess with a sleep, which a loaded machine can overrun."""
    entered = asyncio.Event()
    standin = directory.standin
    commit = standin.commit_create

    async def noting(new: NewHospital) -> Hospital:
        entered.set()
        return await commit(new)

    monkeypatch.setattr(standin, "commit_create", noting)
    return entered


@contextlib.contextmanager
def without_collections() -> Iterator[None]:
    """No garbage collection of this process within: what only a reference cycle keeps
    stays, as it does in the service, whose collector tuning (app.py) makes full collections
    rare; and a benchmark's own pauses stay out of what it times."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
