"""`make bench`: every scenario in order, then the table of figures and their targets.

A missed target is reported, not failed, since the numbers depend on the machine; set
BENCH_STRICT=1 to fail the run on one. BENCH_JSON=path also writes the figures as JSON
lines. BENCH_HISTORY_DB=path keeps the 1,000,000-event database there and reuses it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.store.migrations import migrate
from tests.bench import results, scenarios
from tests.bench.harness import Command, cpus
from tests.bench.results import Report

STRICT = os.environ.get("BENCH_STRICT") == "1"


class Bench:
    """A run's working directory, its figures, and the history database built meanwhile."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.report = Report()
        self.started = time.perf_counter()
        self.load_at_start = os.getloadavg()
        kept = os.environ.get("BENCH_HISTORY_DB")
        self.history_db = Path(kept).resolve() if kept else workdir / "history.db"
        self._kept = kept is not None
        self._seeding: Command | None = None

    def start_seeding(self) -> None:
        """Build the history database in the background (scenario 2 mostly waits)."""
        if self._seeding is None and not self.history_db.exists():
            args = ["-m", "tests.bench.seed_history", str(self.history_db)]
            self._seeding = Command("seed-history", args, self.workdir)

    async def quiet(self) -> None:
        """Let a background seeding finish, so it takes no CPU from what is measured next."""
        if self._seeding is not None:
            started = time.perf_counter()
            line = (await self._seeding.output()).strip().splitlines()[-1]
            waited = time.perf_counter() - started
            print(f"\nhistory database built: {line} (waited {waited:.0f} s for it)")
            self._seeding = None

    async def history(self) -> Path:
        """The history database (built now if no scenario started it), for this run only."""
        self.start_seeding()
        await self.quiet()
        if not self._kept:
            return self.history_db
        # The scenario adds a batch to it: a kept database must stay as it was built. It may
        # have been built before the last migration: the copy is brought up to date.
        copy = self.workdir / "history.db"
        shutil.copyfile(self.history_db, copy)
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            migrate(conn)
        return copy

    def close(self) -> None:
        if self._seeding is not None:
            self._seeding.popen.kill()
            self._seeding.popen.wait()

    def check(self, scenario: str) -> None:
        """Say the scenario is done; under BENCH_STRICT, fail it if it missed a target."""
        minutes = (time.perf_counter() - self.started) / 60
        print(f"\n{scenario}: done at {minutes:.1f} min, load {os.getloadavg()[0]:.2f}")
        missed = self.report.missed(scenario)
        if STRICT and missed:
            pytest.fail(f"{scenario}: missed " + ", ".join(f.label for f in missed))


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    workdir = Path(tempfile.mkdtemp(prefix="hospital-bench-"))
    running = Bench(workdir)
    try:
        yield running
    finally:
        running.close()
        _print_report(running)
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"logs and databases kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _print_report(bench: Bench) -> None:
    minutes = (time.perf_counter() - bench.started) / 60
    loads = " ".join(f"{x:.2f}" for x in bench.load_at_start)
    end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n\n{results.table(bench.report.figures)}\n")
    print(f"total {minutes:.1f} min on {cpus()} CPUs; load average at start {loads}, at end {end}")
    target = os.environ.get("BENCH_JSON")
    if target:
        results.write_json(bench.report.figures, Path(target))
        print(f"figures written to {target}")


async def test_latency_bound(bench: Bench) -> None:
    await scenarios.latency_bound(bench.workdir, bench.report)
    bench.check(scenarios.LATENCY)


async def test_rate_bound(bench: Bench) -> None:
    bench.start_seeding()
    await scenarios.rate_bound(bench.workdir, bench.report)
    bench.check(scenarios.RATE)


async def test_overhead_reads_memory(bench: Bench) -> None:
    await bench.quiet()
    await scenarios.overhead_bound(bench.workdir, bench.report)
    for scenario in (scenarios.OVERHEAD, scenarios.READS, scenarios.MEMORY):
        bench.check(scenario)


async def test_fan_out(bench: Bench) -> None:
    await bench.quiet()
    await scenarios.fan_out(bench.workdir, bench.report)
    bench.check(scenarios.FAN_OUT)


async def test_history_size(bench: Bench) -> None:
    await scenarios.history_size(bench.workdir, bench.report, bench.history)
    bench.check(scenarios.HISTORY)
