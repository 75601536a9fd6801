"""Running the real service and the local directory on loopback, for integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from service.app import create_app
from service.settings import Settings
from service.web.keys import PROCESSOR

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

    async def upload(self, content: str | bytes, **kwargs: Any) -> dict[str, Any]:
        """POST /batch/upload-csv and return the body; asserts it was accepted."""
        async with self.http.post(
            f"{self.url}/batch/upload-csv", data=form(content), **kwargs
        ) as r:
            body = await r.json()
            assert r.status == 202, body
            return dict(body)

    async def get(self, path: str) -> tuple[int, Any]:
        """GET a path; (status, JSON body)."""
        async with self.http.get(self.url + path) as r:
            return r.status, await r.json()

    async def wait_finished(self, batch_id: str, within: float = 20.0) -> dict[str, Any]:
        """Poll /status until the batch settles; its final body."""
        deadline = time.monotonic() + within
        while True:
            status, body = await self.get(f"/batch/{batch_id}/status")
            assert status == 200, body
            if body["processing_status"] in FINISHED and await self.idle(batch_id):
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
