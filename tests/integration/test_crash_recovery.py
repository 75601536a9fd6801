"""SIGKILL the service at seeded random moments: every batch still ends exactly once upstream."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest

from service.local_directory import RunningDirectory
from service.projections.rebuild import rebuild
from tests.integration.chaos import (
    TALLY,
    assert_exactly_once,
    status,
    trials,
    upload,
    wait_settled,
)
from tests.support import ServiceProcess, csv_of


@pytest.mark.parametrize("seed", trials(quick=4, long=40))
async def test_sigkill_at_a_random_moment_loses_and_duplicates_nothing(
    seed: int, directory: RunningDirectory, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    directory.standin.set_delay(0.3, jitter=0.2)
    db = tmp_path / "crash.db"
    service = ServiceProcess(db, directory.url)
    async with aiohttp.ClientSession() as http:
        await service.start(http)
        batches = [
            await upload(http, service.url, csv_of(rng.randint(21, 45), "Large")),
            await upload(http, service.url, csv_of(rng.randint(1, 20), "Small")),
        ]
        await asyncio.sleep(rng.uniform(0.0, 1.2))
        service.kill()
        TALLY["SIGKILLs at random moments"] += 1
        await service.start(http)
        finals = await wait_settled(http, service.url, batches)
        await service.stop()
    assert [f["processing_status"] for f in finals] == ["completed", "completed"]
    assert_exactly_once(directory.standin, finals)
    assert rebuild(str(db)).equal


async def test_sigkill_during_activation(directory: RunningDirectory, tmp_path: Path) -> None:
    directory.standin.set_delay(0.2)
    directory.standin.add_fault("batch_activate", "hang")  # the PATCH is in flight when killed
    db = tmp_path / "crash.db"
    service = ServiceProcess(db, directory.url, LOG_LEVEL="INFO")
    async with aiohttp.ClientSession() as http:
        await service.start(http)
        batch = await upload(http, service.url, csv_of(30))
        while directory.standin.request_counts["batch_activate"] == 0:
            await asyncio.sleep(0.02)
        service.kill()
        directory.standin.clear_faults()
        await service.start(http)
        finals = await wait_settled(http, service.url, [batch])
        await service.stop()
    assert finals[0]["processing_status"] == "completed"
    assert_exactly_once(directory.standin, finals)
    recovered = f"recovering batch {batch}: 30 created, 0 failed of 30 rows; 0 to send, 0 to"
    assert recovered in service.log.read_text()


async def test_a_restart_after_an_activation_took_effect_sends_it_no_more(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    # Killed after the directory activated the lead upstream batch, before the log said so:
    # the restart's look finds it all active and sends no second PATCH, which the directory
    # would refuse (400) and count against its limit.
    directory.standin.set_delay(0.2)
    directory.standin.add_fault("batch_activate", "hang", nth=[1])
    db = tmp_path / "crash.db"
    service = ServiceProcess(db, directory.url)
    async with aiohttp.ClientSession() as http:
        await service.start(http)
        batch = await upload(http, service.url, csv_of(30))
        while directory.standin.request_counts["batch_activate"] == 0:
            await asyncio.sleep(0.02)
        lead = directory.standin.all_hospitals()[0]["creation_batch_id"]
        async with http.patch(f"{directory.url}/hospitals/batch/{lead}/activate") as r:
            assert r.status == 200  # as the hung PATCH would have, just before the kill
        service.kill()
        await service.start(http)
        finals = await wait_settled(http, service.url, [batch])
        await service.stop()
    assert finals[0]["processing_status"] == "completed"
    assert_exactly_once(directory.standin, finals)
    # The hung one, the test's, and the other upstream batch's: none of the lead again.
    assert directory.standin.request_counts["batch_activate"] == 3


async def test_a_restart_after_activations_took_effect_sends_no_other_upstream_batch_one(
    directory: RunningDirectory, tmp_path: Path
) -> None:
    # Three upstream batches: the lead is activated, then the other two at once; one of them
    # took, the other hangs unprocessed when the kill comes, before the log says anything.
    # The restart finds the lead all active, so a round it did not record ran: the other
    # two are read back first, and only the one with nothing active gets a PATCH.
    directory.standin.set_delay(0.2)
    directory.standin.add_fault("batch_activate", "hang", nth=[3])
    db = tmp_path / "crash.db"
    service = ServiceProcess(db, directory.url)
    async with aiohttp.ClientSession() as http:
        await service.start(http)
        batch = await upload(http, service.url, csv_of(45))
        while sum(h["active"] for h in directory.standin.all_hospitals()) < 40:
            await asyncio.sleep(0.02)
        while directory.standin.request_counts["batch_activate"] < 3:
            await asyncio.sleep(0.02)
        service.kill()
        await service.start(http)
        finals = await wait_settled(http, service.url, [batch])
        await service.stop()
    assert finals[0]["processing_status"] == "completed"
    assert_exactly_once(directory.standin, finals)
    # The three before the kill, then the hung one's again: none of those that took.
    assert directory.standin.request_counts["batch_activate"] == 4


async def test_sigkill_during_rollback(directory: RunningDirectory, tmp_path: Path) -> None:
    directory.standin.set_delay(0.2)
    db = tmp_path / "crash.db"
    service = ServiceProcess(db, directory.url)
    async with aiohttp.ClientSession() as http:
        await service.start(http)
        batch = await upload(http, service.url, csv_of(25))
        await wait_settled(http, service.url, [batch])
        directory.standin.add_fault("batch_delete", "hang", nth=[2])  # kill between deletes
        async with http.delete(f"{service.url}/batch/{batch}") as r:
            assert r.status in (200, 202)
        while directory.standin.request_counts["batch_delete"] < 2:
            await asyncio.sleep(0.02)
        service.kill()
        directory.standin.clear_faults()
        await service.start(http)
        for _ in range(100):
            final = await status(http, service.url, batch)
            if final["rolled_back"]:
                break
            await asyncio.sleep(0.1)
        await service.stop()
    assert final["rolled_back"] is True
    assert {h["status"] for h in final["hospitals"]} == {"deleted"}
    assert directory.standin.all_hospitals() == []
