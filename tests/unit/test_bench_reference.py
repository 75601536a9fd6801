"""The benchmark's references and its figures file: what scenario 3's ratio is taken
against, and what BENCH_JSON holds."""

from __future__ import annotations

import gc
import json
from pathlib import Path

from service.local_directory import DirectoryOptions, run_directory
from tests.bench import results
from tests.bench.results import at_least, at_most, exactly
from tests.bench.scenarios import bare_loop, create_bodies


async def test_the_bare_loop_runs_without_the_bench_process_heap_in_its_collections() -> None:
    # A script posting creates holds little besides its bodies; the bench process holds
    # pytest and every module the bench imports. A full collection of that heap (60-165 ms
    # per 5,000-row run measured here) slowed the reference the service is divided by.
    young: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] < 2:
            young.append(gc.get_freeze_count())

    async with run_directory(DirectoryOptions(create_delay=0.0, rate_limit=False)) as d:
        bodies = create_bodies(200, "Probe")
        gc.unfreeze()
        gc.collect()  # no young collection is due before the loop starts
        thresholds = gc.get_threshold()  # a service app run in this process raised them
        gc.set_threshold(700, 10, 10)  # the interpreter's own, as a bench process has
        gc.callbacks.append(note)
        try:
            await bare_loop(d.url, bodies, 20)
        finally:
            gc.callbacks.remove(note)
            gc.set_threshold(*thresholds)
    assert young, "no collection ran during the loop"
    assert min(young) > 0, "the loop's collections scanned what the bench held before it"
    assert gc.get_freeze_count() == 0, "the bench's heap is left frozen after the loop"


def test_json_targets_hold_plain_numbers(tmp_path: Path) -> None:
    report = results.Report()
    report.add("6", "history.rebuild_rate", "rebuild", 156_691.0, "events/s", at_least(50_000))
    report.add("6", "history.events", "events", 1_000_000, "", exactly(1_000_000))
    report.add("1", "latency_bound.wall_over_floor", "wall / floor", 1.004, "", at_most(1.05))
    path = tmp_path / "figures.jsonl"
    results.write_json(report.figures, path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["target"] for line in lines] == [">= 50000", "== 1000000", "<= 1.05"]
    assert [float(line["target"].split()[1]) for line in lines] == [50_000, 1_000_000, 1.05]
    # The table, for people, keeps its thousands separators.
    assert ">= 50,000 events/s" in results.table(report.figures)
