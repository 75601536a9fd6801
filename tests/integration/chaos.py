"""Helpers shared by the crash and fault suites: uploads, waiting, and the exactly-once check."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Any

import aiohttp

from service.local_directory import StandIn
from tests.support import FINISHED, form

LONG = os.environ.get("CHAOS") == "long"
# What the chaos suites did, printed at the end of the run (tests/conftest.py).
TALLY: Counter[str] = Counter()


def trials(quick: int, long: int) -> range:
    """How many seeded trials: a few in `make test`, many in `make chaos`."""
    return range(long if LONG else quick)


async def upload(http: aiohttp.ClientSession, url: str, content: str) -> str:
    """Upload a CSV; its batch id."""
    async with http.post(f"{url}/batch/upload-csv", data=form(content)) as r:
        body = await r.json()
        assert r.status == 202, body
        return str(body["batch_id"])


async def status(http: aiohttp.ClientSession, url: str, batch_id: str) -> dict[str, Any]:
    """The batch's /status body."""
    async with http.get(f"{url}/batch/{batch_id}/status") as r:
        assert r.status == 200
        return dict(await r.json())


async def wait_settled(
    http: aiohttp.ClientSession, url: str, batch_ids: list[str], within: float = 60.0
) -> list[dict[str, Any]]:
    """Poll until every batch is finished and, if rolling back, rolled back."""
    deadline = time.monotonic() + within
    while True:
        finals = [await status(http, url, b) for b in batch_ids]
        if all(_settled(f) for f in finals):
            return finals
        assert time.monotonic() < deadline, [f["processing_status"] for f in finals]
        await asyncio.sleep(0.1)


def _settled(final: dict[str, Any]) -> bool:
    if final["processing_status"] not in FINISHED:
        return False
    rows = final["hospitals"]
    return not any(h["status"] == "pending" for h in rows)


def assert_exactly_once(standin: StandIn, finals: list[dict[str, Any]]) -> None:
    """Every created row is exactly one hospital upstream, nothing else is, activation agrees."""
    TALLY["batches checked exactly once"] += len(finals)
    TALLY["duplicates found"] += len(standin.duplicates())
    assert standin.duplicates() == []
    stored = {h["id"]: h for h in standin.all_hospitals()}
    expected = 0
    for final in finals:
        live = [
            h for h in final["hospitals"] if h["status"] in ("created", "created_and_activated")
        ]
        ids = [h["hospital_id"] for h in live]
        assert len(set(ids)) == len(ids), "two rows claim one hospital"
        for row in live:
            hospital = stored.get(row["hospital_id"])
            assert hospital is not None, f"row {row['row']} claims a hospital that does not exist"
            assert (hospital["name"], hospital["address"], hospital["phone"]) == (
                row["name"],
                row["address"],
                row["phone"],
            )
            assert hospital["active"] is (final["processing_status"] == "completed")
        expected += len(live)
    assert len(stored) == expected, "the directory holds hospitals no row accounts for"
