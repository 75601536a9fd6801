"""Many uploads at once with many pollers: all accepted, all finished, no error logged."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from service.local_directory import RunningDirectory
from tests.integration.chaos import LONG, assert_exactly_once
from tests.support import FINISHED, ServiceFactory, csv_of

UPLOADS = 200 if LONG else 50
POLLERS = 100


async def test_concurrent_uploads_and_pollers(
    service_factory: ServiceFactory,
    directory: RunningDirectory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    directory.standin.set_delay(0.02)
    async with service_factory() as service:
        accepted = await asyncio.gather(
            *(service.upload(csv_of(20, f"U{i}")) for i in range(UPLOADS))
        )
        batch_ids = [a["batch_id"] for a in accepted]
        polls = 0

        async def poll(seed: int) -> None:
            nonlocal polls
            rng = random.Random(seed)
            while True:
                batch_id = rng.choice(batch_ids)
                path = rng.choice(("progress", "status"))
                status, body = await service.get(f"/batch/{batch_id}/{path}")
                assert status == 200, body
                polls += 1
                watched = [
                    await service.get(f"/batch/{b}/progress") for b in batch_ids[seed % 25 :: 25]
                ]
                if all(body["processing_status"] in FINISHED for _, body in watched):
                    return

        await asyncio.wait_for(asyncio.gather(*(poll(i) for i in range(POLLERS))), 120)
        finals = [await service.wait_finished(b) for b in batch_ids]

    assert len(set(batch_ids)) == UPLOADS
    assert {f["processing_status"] for f in finals} == {"completed"}
    assert polls >= POLLERS
    assert_exactly_once(directory.standin, finals)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], [r.getMessage() for r in problems]
    assert not any("database is locked" in r.getMessage() for r in caplog.records)
