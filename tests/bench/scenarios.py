"""The benchmark scenarios of `make bench`: each runs fresh processes and records figures.

Every ratio is taken against its reference measured in the same run, on the same machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from tests.bench import harness
from tests.bench.harness import WINDOW_SECONDS, Directory, Service
from tests.bench.raw_follow import Follower
from tests.bench.results import Report, at_least, at_most, exactly
from tests.bench.seed_history import TOTAL_EVENTS
from tests.support import FINISHED, csv_of, form, without_collections

LATENCY = "1 latency-bound"
RATE = "2 rate-bound"
OVERHEAD = "3 overhead-bound"
READS = "4 read path"
FAN_OUT = "5 fan-out"
HISTORY = "6 history size"
MEMORY = "7 memory"

CREATE_DELAY = 5.0  # the real directory's create delay, for scenarios 1 and 2
OVERHEAD_ROWS = 5_000
OVERHEAD_WORKERS = 20
BARE_RUNS = 3
READ_RUNS = 8  # files processed under the readers; their answers are pooled
PROGRESS_POLLERS = 100
STATUS_POLLERS = 20
POLL_INTERVAL = 1.0  # each reader polls once a second, like a dashboard
FAN_OUT_ROWS = 1_000
FAN_OUT_CLIENTS = 500
FAN_OUT_HOLD = 25.0  # the directory sleeps this long so every client is connected first
FAN_OUT_WITHIN = 120.0  # the fan-out is cut off this long after that; missing deliveries count


def unlimited() -> aiohttp.ClientSession:
    """A client session whose pool does not cap the readers' connections."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def upload(http: aiohttp.ClientSession, url: str, content: str) -> str:
    """POST /batch/upload-csv; the batch id."""
    async with http.post(f"{url}/batch/upload-csv", data=form(content)) as r:
        body = await r.json()
        if r.status != 202:
            raise RuntimeError(f"upload refused ({r.status}): {body}")
        return str(body["batch_id"])


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as r:
        r.raise_for_status()
        return await r.json()


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def recorded_at(http: aiohttp.ClientSession, url: str) -> dict[int, float]:
    """Each stream version's commit time, from a batch's /events pages."""
    found: dict[int, float] = {}
    after = -1
    while True:
        page = await get_json(http, f"{url}?after={after}&limit=1000")
        found.update((e["stream_version"], _timestamp(e["recorded_at"])) for e in page["events"])
        if not page["events"]:
            return found
        after = page["next_after"]


# Scenarios 1 and 2: the directory's delay and limits set the floor ---------------------------


@dataclass(frozen=True)
class Floor:
    """The directory's own timings, measured directly: one create, one activation."""

    create: float
    activate: float


async def directory_floor(http: aiohttp.ClientSession, d: Directory) -> Floor:
    """Time one create and one activation against the directory, then wipe it."""
    batch = str(uuid.uuid4())
    body = {"name": "Probe", "address": "1 Probe Street", "phone": None, "creation_batch_id": batch}
    started = time.perf_counter()
    async with http.post(f"{d.url}/hospitals/", json=body) as r:
        await r.read()
        r.raise_for_status()
    created = time.perf_counter()
    async with http.patch(f"{d.url}/hospitals/batch/{batch}/activate") as r:
        await r.read()
        r.raise_for_status()
    floor = Floor(created - started, time.perf_counter() - created)
    # A fresh directory: the service's first window must be its own, as after an idle spell.
    await d.control(http, "restart")
    return floor


@dataclass
class Followed:
    """What one websocket client saw of a batch."""

    events: list[dict[str, Any]] = field(default_factory=list)  # the `event` of each message
    versions: list[int] = field(default_factory=list)  # stream version of each message
    completed_at: float | None = None  # perf_counter when a message first said finished
    status: str | None = None
    finished: bool = False

    @property
    def last(self) -> int:
        return self.versions[-1] if self.versions else -1

    def take(self, data: str) -> None:
        """Note one message."""
        now = time.perf_counter()
        body = json.loads(data)
        if body["type"] == "event":
            self.versions.append(body["version"])
            self.events.append(body["event"])
        if body["type"] in ("event", "finished"):
            status = body["progress"]["processing_status"]
            if status in FINISHED and self.completed_at is None:
                self.completed_at, self.status = now, status
        self.finished = body["type"] == "finished"


async def follow(http: aiohttp.ClientSession, url: str, batch_id: str) -> Followed:
    """Follow a batch's websocket from its first event to `finished`, as a client should:
    after a resync request or a lost connection, reconnect with ?after=<last version>."""
    seen = Followed()
    while True:
        try:
            path = f"{url}/batch/{batch_id}/ws?after={seen.last}"
            async with http.ws_connect(path, heartbeat=None, max_msg_size=0) as ws:
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    seen.take(msg.data)
                    if seen.finished:
                        return seen
        except (aiohttp.ClientError, OSError):
            await asyncio.sleep(0.5)


async def latency_bound(workdir: Path, report: Report) -> None:
    """A 20-row file against the real directory's 5 s creates: one burst, one delay."""
    async with (
        harness.directory(workdir, CREATE_DELAY, rate_limit=True, name="s1-directory") as d,
        harness.service(workdir, d.url, workdir / "s1.db", name="s1-service") as s,
        aiohttp.ClientSession() as http,
    ):
        floor = await directory_floor(http, d)
        started = time.perf_counter()
        batch_id = await upload(http, s.url, csv_of(20, "Latency"))
        seen = await asyncio.wait_for(follow(http, s.url, batch_id), 120)
        assert seen.completed_at is not None
        wall = seen.completed_at - started
        async with http.get(f"{d.url}/hospitals/batch/{batch_id}") as r:
            stored = await r.json() if r.status == 200 else []
    sent = [datetime.fromisoformat(h["created_at"]).timestamp() for h in stored]
    spread = max(sent) - min(sent) if sent else None
    add = report.add
    add(
        LATENCY,
        "latency_bound.floor",
        "floor: one create + one activation",
        floor.create + floor.activate,
        "s",
    )
    add(LATENCY, "latency_bound.wall", f"upload to completed ({seen.status}, websocket)", wall, "s")
    add_completed(report, LATENCY, "latency_bound", [str(seen.status)])
    add(
        LATENCY,
        "latency_bound.wall_over_floor",
        "wall / floor",
        wall / (floor.create + floor.activate),
        "",
        at_most(1.05),
    )
    add(
        LATENCY,
        "latency_bound.create_spread",
        "spread of the 20 creates (one burst)",
        spread,
        "s",
        at_most(1.0),
    )


async def rate_bound(workdir: Path, report: Report) -> None:
    """A 65-row file under the directory's 30 creates a minute: three windows."""
    rows = 65
    async with (
        harness.directory(workdir, CREATE_DELAY, rate_limit=True, name="s2-directory") as d,
        harness.service(workdir, d.url, workdir / "s2.db", name="s2-service") as s,
        aiohttp.ClientSession() as http,
    ):
        floor = await directory_floor(http, d)
        before = await d.state(http)
        started = time.perf_counter()
        batch_id = await upload(http, s.url, csv_of(rows, "Rate"))
        seen = await asyncio.wait_for(follow(http, s.url, batch_id), 6 * WINDOW_SECONDS)
        assert seen.completed_at is not None
        wall = seen.completed_at - started
        after = await d.state(http)
    floor_seconds = 2 * WINDOW_SECONDS + floor.create + floor.activate
    counts = before["request_counts"], after["request_counts"]
    creates_sent = counts[1].get("create", 0) - counts[0].get("create", 0)
    refused = creates_sent - after["hospital_count"]
    requested = [
        _timestamp(e["recorded_at"]) for e in seen.events if e["event_type"] == "HospitalRequested"
    ]
    late_429s = sum(
        1
        for e in seen.events
        if e["event_type"] == "HospitalRetryScheduled"
        and e["data"]["reason"] == "rate_limited"
        and _timestamp(e["recorded_at"]) >= min(requested) + WINDOW_SECONDS
    )
    add = report.add
    add(
        RATE,
        "rate_bound.floor",
        "floor: 2 windows + one create + one activation",
        floor_seconds,
        "s",
    )
    add(RATE, "rate_bound.wall", f"upload to completed ({seen.status}, websocket)", wall, "s")
    add_completed(report, RATE, "rate_bound", [str(seen.status)])
    add(RATE, "rate_bound.wall_over_floor", "wall / floor", wall / floor_seconds, "", at_most(1.10))
    add(RATE, "rate_bound.429s", "429 answers from the directory", refused, "")
    add(RATE, "rate_bound.late_429s", "429s after the first window", late_429s, "", exactly(0))
    add(
        RATE,
        "rate_bound.duplicates",
        "duplicates in the directory",
        len(after["duplicates"]),
        "",
        exactly(0),
    )


# Scenarios 3, 4 and 7: throughput against a directory that answers at once ------------------


@contextlib.contextmanager
def own_heap_only() -> Iterator[None]:
    """Collections within see only what is allocated within, as in a script of its own.

    The bench process holds pytest and every module the bench imports; a full collection
    of it took 60-165 ms of a 5,000-row bare loop, slowing the reference the service is
    divided by. The service leaves its start-up heap out of its collections too (app.py).
    No collection first: freezing costs nothing, so the bare loop's CPU figure stays its own.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def bare_loop(url: str, bodies: list[dict[str, Any]], in_flight: int) -> float:
    """Seconds for a plain aiohttp loop to post every body with `in_flight` at once."""
    with own_heap_only():
        return await _bare_loop(url, bodies, in_flight)


async def _bare_loop(url: str, bodies: list[dict[str, Any]], in_flight: int) -> float:
    gate = asyncio.Semaphore(in_flight)
    connector = aiohttp.TCPConnector(limit=in_flight)  # the service's pool size
    async with aiohttp.ClientSession(connector=connector) as http:

        async def create(body: dict[str, Any]) -> None:
            async with gate, http.post(f"{url}/hospitals/", json=body) as r:
                await r.json()
                r.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(create(b) for b in bodies))
        return time.perf_counter() - started


def create_bodies(rows: int, prefix: str) -> list[dict[str, Any]]:
    """The creates the service sends for csv_of(rows, prefix): 20 rows per upstream batch."""
    batches = [str(uuid.uuid4()) for _ in range(0, rows, 20)]
    return [
        {
            "name": f"{prefix} {n}",
            "address": f"{n} Main Street",
            "phone": f"555-{n:04d}",
            "creation_batch_id": batches[(n - 1) // 20],
        }
        for n in range(1, rows + 1)
    ]


@dataclass
class Processed:
    """One file through the service, and what its readers saw meanwhile."""

    seconds: float
    rows: int
    events: int
    statuses: list[str]  # how the file ended; each file's, for files pooled
    duplicates: int
    latencies: dict[str, list[float]]
    service_cpu: harness.Cpu  # from upload to finished, the finish checks every 50 ms included
    directory_cpu: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds

    @property
    def ended(self) -> str:
        """Each status the files ended in, once."""
        return ended(self.statuses)

    def p(self, path: str, q: float) -> float:
        """A latency percentile of one endpoint, in milliseconds."""
        return 1000 * harness.percentile(self.latencies[path], q)


async def _poll(
    http: aiohttp.ClientSession, url: str, stop: asyncio.Event, latencies: list[float]
) -> None:
    await asyncio.sleep(random.uniform(0, POLL_INTERVAL))
    due = time.perf_counter()
    while not stop.is_set():
        started = time.perf_counter()
        async with http.get(url) as r:
            await r.read()
            r.raise_for_status()
        latencies.append(time.perf_counter() - started)
        due += POLL_INTERVAL
        await asyncio.sleep(max(0.0, due - time.perf_counter()))


async def process_file(
    http: aiohttp.ClientSession, s: Service, d: Directory, prefix: str, readers: bool
) -> Processed:
    """Upload OVERHEAD_ROWS rows and time them to the end, with or without the readers."""
    await d.control(http, "restart")
    content = csv_of(OVERHEAD_ROWS, prefix)
    # A full collection of the bench (20-35 ms) stops every poller: kept out of the timings.
    with without_collections():
        service_from, directory_from = s.process.cpu(), d.process.cpu()
        started = time.perf_counter()
        batch_id = await upload(http, s.url, content)
        stop = asyncio.Event()
        latencies: dict[str, list[float]] = {"progress": [], "status": []}
        pollers = [
            asyncio.create_task(
                _poll(http, f"{s.url}/batch/{batch_id}/{path}", stop, latencies[path])
            )
            for path, count in (("progress", PROGRESS_POLLERS), ("status", STATUS_POLLERS))
            for _ in range(count if readers else 0)
        ]
        try:
            while True:
                progress = await get_json(http, f"{s.url}/batch/{batch_id}/progress")
                if progress["processing_status"] in FINISHED:
                    break
                await asyncio.sleep(0.05)
            seconds = time.perf_counter() - started
            service_cpu = s.process.cpu() - service_from
            directory_cpu = (d.process.cpu() - directory_from).process
        finally:
            stop.set()
            await asyncio.gather(*pollers)
    status = await get_json(http, f"{s.url}/batch/{batch_id}/status")
    state = await d.state(http)
    return Processed(
        seconds,
        OVERHEAD_ROWS,
        status["version"] + 1,
        [status["processing_status"]],
        len(state["duplicates"]),
        latencies,
        service_cpu,
        directory_cpu,
    )


async def under_readers(
    http: aiohttp.ClientSession, s: Service, d: Directory, prefix: str
) -> Processed:
    """READ_RUNS files with the readers polling: the median file, with every file's answers
    and statuses.

    One file gives some 130 /progress and 26 /status answers, so each p99 was about its
    slowest answer; pooled, the /status p99 is about the third slowest of some 200, and
    the /progress p99 the eleventh of some 1,000.
    """
    runs = [await process_file(http, s, d, prefix, readers=True) for _ in range(READ_RUNS)]
    pooled = {path: [x for run in runs for x in run.latencies[path]] for path in runs[0].latencies}
    statuses = [status for run in runs for status in run.statuses]
    return replace(median_run(runs), latencies=pooled, statuses=statuses)


def median_run(runs: list[Processed]) -> Processed:
    """The run of median throughput."""
    return sorted(runs, key=lambda run: run.rows_per_second)[len(runs) // 2]


def ended(statuses: list[str]) -> str:
    """Each of `statuses` once, for a label."""
    return ", ".join(sorted(set(statuses)))


def add_completed(report: Report, scenario: str, name: str, statuses: list[str]) -> None:
    """How many of the runs ended `completed`: one that ended otherwise timed something else."""
    report.add(
        scenario,
        f"{name}.completed",
        f"runs that ended completed, of {len(statuses)}",
        statuses.count("completed"),
        "",
        exactly(len(statuses)),
    )


# Where scenario 3's time goes, median of its runs. Each loop runs on one thread, so when
# both are busy all the time the ratio is about bare / service_loop.
CPU_FIGURES = {
    "bare": ("CPU per row: bare loop (one thread)", "µs"),
    "service_loop": ("CPU per row: the service's event-loop thread", "µs"),
    "service": ("CPU per row: the service, all threads (the log's writer too)", "µs"),
    "loop_busy": ("the service's event-loop thread: share of a core it used", ""),
    "directory_bare": ("CPU per row: the directory, during the bare loop", "µs"),
    "directory_service": ("CPU per row: the directory, during the service", "µs"),
}


def per_row(cpu_seconds: float) -> float:
    """Microseconds of CPU per row of a scenario 3 file."""
    return cpu_seconds / OVERHEAD_ROWS * 1e6


def overhead_settings() -> dict[str, str]:
    """Pacing off, 20 workers, files of OVERHEAD_ROWS rows allowed."""
    return {
        "DIRECTORY_CREATES_PER_MINUTE": "0",
        "DIRECTORY_BATCH_CALLS_PER_MINUTE": "0",
        "DIRECTORY_CONCURRENCY": str(OVERHEAD_WORKERS),
        "CSV_MAX_ROWS": str(OVERHEAD_ROWS),
    }


async def overhead_bound(workdir: Path, report: Report) -> None:
    """5,000 rows against an instant directory: the service's own cost per row."""
    async with (
        harness.directory(workdir, 0.0, rate_limit=False, name="s3-directory") as d,
        harness.service(
            workdir, d.url, workdir / "s3.db", name="s3-service", **overhead_settings()
        ) as s,
        unlimited() as http,
    ):
        await bare_loop(d.url, create_bodies(500, "Warm-up"), OVERHEAD_WORKERS)
        bares, runs = [], []
        cpu: dict[str, list[float]] = {name: [] for name in CPU_FIGURES}  # µs per row
        # The machine's speed drifts by tens of percent within minutes: the reference and
        # the service take turns, and each side's median is compared.
        for _ in range(BARE_RUNS):
            await d.control(http, "restart")
            bodies = create_bodies(OVERHEAD_ROWS, "Bare")
            mine, directory_before = time.thread_time(), d.process.cpu()
            seconds = await bare_loop(d.url, bodies, OVERHEAD_WORKERS)
            cpu["bare"].append(per_row(time.thread_time() - mine))
            cpu["directory_bare"].append(per_row((d.process.cpu() - directory_before).process))
            bares.append(OVERHEAD_ROWS / seconds)
            run = await process_file(http, s, d, "Overhead", readers=False)
            runs.append(run)
            cpu["service_loop"].append(per_row(run.service_cpu.main_thread))
            cpu["service"].append(per_row(run.service_cpu.process))
            cpu["loop_busy"].append(run.service_cpu.main_thread / run.seconds)
            cpu["directory_service"].append(per_row(run.directory_cpu))
        bare = statistics.median(bares)
        clean = median_run(runs)
        peak = s.process.memory().peak_mb
        on_uvloop = []
        for _ in range(BARE_RUNS):  # the loop the service runs on, for comparison only
            await d.control(http, "restart")
            bodies = create_bodies(OVERHEAD_ROWS, "Uvloop")
            seconds = await asyncio.to_thread(
                uvloop.run, bare_loop(d.url, bodies, OVERHEAD_WORKERS)
            )
            on_uvloop.append(OVERHEAD_ROWS / seconds)
        loaded = await under_readers(http, s, d, "Read")
        peak_with_readers = s.process.memory().peak_mb
    add = report.add
    statuses = [status for run in runs for status in run.statuses]
    add(
        OVERHEAD,
        "overhead_bound.bare_rows_per_second",
        f"bare aiohttp loop, 20 in flight (median of {BARE_RUNS}: "
        + ", ".join(f"{x:.0f}" for x in sorted(bares))
        + ")",
        bare,
        "rows/s",
    )
    add(
        OVERHEAD,
        "overhead_bound.rows_per_second",
        f"service, 20 workers ({ended(statuses)}; median of {BARE_RUNS}: "
        + ", ".join(f"{x:.0f}" for x in sorted(r.rows_per_second for r in runs))
        + ")",
        clean.rows_per_second,
        "rows/s",
    )
    add(
        OVERHEAD,
        "overhead_bound.ratio",
        "service / bare loop",
        clean.rows_per_second / bare,
        "",
        at_least(0.75),
    )
    for name, (label, unit) in CPU_FIGURES.items():
        add(OVERHEAD, f"overhead_bound.cpu.{name}", label, statistics.median(cpu[name]), unit)
    # The directory runs on the same CPUs: a row costs the CPU of both processes.
    cpus = harness.cpus()
    row_cpu = statistics.median(cpu["service"]) + statistics.median(cpu["directory_service"])
    add(
        OVERHEAD,
        "overhead_bound.cpu_ceiling",
        f"the ratio that CPU a row allows, service and directory keeping {cpus} CPUs busy",
        cpus / (row_cpu * 1e-6) / bare,
        "",
    )
    add(
        OVERHEAD,
        "overhead_bound.bare_uvloop_rows_per_second",
        f"the same bare loop on uvloop (median of {BARE_RUNS}: "
        + ", ".join(f"{x:.0f}" for x in sorted(on_uvloop))
        + ")",
        statistics.median(on_uvloop),
        "rows/s",
    )
    add(
        OVERHEAD,
        "overhead_bound.ratio_uvloop",
        "service / bare loop on uvloop",
        clean.rows_per_second / statistics.median(on_uvloop),
        "",
    )
    add(
        OVERHEAD,
        "overhead_bound.events_per_second",
        "events appended per second",
        clean.events / clean.seconds,
        "events/s",
    )
    add(
        OVERHEAD,
        "overhead_bound.duplicates",
        f"duplicates in the directory, {BARE_RUNS} runs",
        sum(run.duplicates for run in runs),
        "",
        exactly(0),
    )
    add_completed(report, OVERHEAD, "overhead_bound", statuses)
    reads(report, READS, "read_path", loaded, targets=True)
    add_completed(report, READS, "read_path", loaded.statuses)
    add(
        READS,
        "read_path.rows_per_second",
        f"service rows/s under this read load ({loaded.ended}; median of {READ_RUNS})",
        loaded.rows_per_second,
        "rows/s",
    )
    add(MEMORY, "memory.peak_rss", "service peak RSS during scenario 3", peak, "MB", at_most(200))
    add(
        MEMORY,
        "memory.peak_rss_with_readers",
        "service peak RSS, scenario 4 included",
        peak_with_readers,
        "MB",
    )


def reads(report: Report, scenario: str, prefix: str, run: Processed, targets: bool) -> None:
    """p50 and p99 of both readers' latencies; p99 against 50 ms with `targets`."""
    for path, count in (("progress", PROGRESS_POLLERS), ("status", STATUS_POLLERS)):
        answers = len(run.latencies[path])
        where = f"/{path}, {count} clients at {1 / POLL_INTERVAL:g}/s ({answers} answers)"
        target = at_most(50) if targets else None
        report.add(scenario, f"{prefix}.{path}_p50", f"{where}: p50", run.p(path, 50), "ms")
        report.add(scenario, f"{prefix}.{path}_p99", f"{where}: p99", run.p(path, 99), "ms", target)


# Scenario 5: one batch, many websocket followers ----------------------------------------------


async def fan_out(workdir: Path, report: Report) -> None:
    """500 websocket clients follow one 1,000-row batch from its first event to the end.

    A message's receipt is when its bytes reached the client: the clients decode what they
    got after the run, so that one process parsing 550,000 messages does not add to the lag.
    """
    settings = {
        "DIRECTORY_CREATES_PER_MINUTE": "0",
        "DIRECTORY_BATCH_CALLS_PER_MINUTE": "0",
        "CSV_MAX_ROWS": str(FAN_OUT_ROWS),
    }
    async with (
        harness.directory(workdir, 0.0, rate_limit=False, name="s5-directory") as d,
        harness.service(workdir, d.url, workdir / "s5.db", name="s5-service", **settings) as s,
        aiohttp.ClientSession() as http,
    ):
        # The service's first call wakes the directory: hold it until every client follows.
        await d.control(http, "cold-start", {"seconds": FAN_OUT_HOLD})
        batch_id = await upload(http, s.url, csv_of(FAN_OUT_ROWS, "Fan-out"))
        with without_collections():  # the bench's own pauses kept out of the lags
            clients = [Follower() for _ in range(FAN_OUT_CLIENTS)]
            started = time.perf_counter()
            tasks = [asyncio.create_task(client.follow(s.url, batch_id)) for client in clients]
            all_connected = asyncio.gather(*(client.connected.wait() for client in clients))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_connected, 2 * FAN_OUT_HOLD)
            live_from = time.time()
            connect_seconds = time.perf_counter() - started
            connected_clients = sum(client.connected.is_set() for client in clients)
            done, cut_off = await asyncio.wait(tasks, timeout=FAN_OUT_WITHIN)
            ended = time.time()
            for task in cut_off:
                task.cancel()
            await asyncio.gather(*cut_off, return_exceptions=True)
        for task in done:
            task.result()
        status = await get_json(http, f"{s.url}/batch/{batch_id}/status")
        recorded = await recorded_at(http, f"{s.url}/batch/{batch_id}/events")
    live = {v for v, at in recorded.items() if at >= live_from}
    delivered = [client.delivered() for client in clients]
    lags, missing = [], 0
    for seen in delivered:
        got = dict(zip(seen.versions, seen.received, strict=True))
        for version in live:
            if version in got:
                lags.append(got[version] - recorded[version])
            else:  # never arrived: its lag is at least the time the run was given
                lags.append(ended - recorded[version])
                missing += 1
    in_order = sum(seen.in_order(status["version"]) for seen in delivered)
    add = report.add
    add_completed(report, FAN_OUT, "fan_out", [status["processing_status"]])
    add(
        FAN_OUT,
        "fan_out.connect",
        f"{connected_clients} of {FAN_OUT_CLIENTS} clients connected in",
        connect_seconds,
        "s",
    )
    add(
        FAN_OUT,
        "fan_out.events",
        f"events of the batch ({status['processing_status']}), live ones",
        len(live),
        "",
    )
    add(
        FAN_OUT,
        "fan_out.in_order",
        "clients that got every event in order",
        in_order,
        "",
        exactly(FAN_OUT_CLIENTS),
    )
    add(
        FAN_OUT,
        "fan_out.missing",
        f"deliveries missing after {FAN_OUT_WITHIN:g} s",
        missing,
        "",
        exactly(0),
    )
    add(
        FAN_OUT,
        "fan_out.resyncs",
        "resyncs (close 4000, reconnect with ?after)",
        sum(c.resyncs for c in clients),
        "",
    )
    add(
        FAN_OUT,
        "fan_out.lag_p50",
        "lag, append to its bytes at the client: p50",
        1000 * harness.percentile(lags, 50),
        "ms",
    )
    add(
        FAN_OUT,
        "fan_out.drops",
        "connections lost (reconnected with ?after)",
        sum(c.drops for c in clients),
        "",
    )
    bound = " (at least: missing ones count until the cut-off)" if missing else ""
    add(
        FAN_OUT,
        "fan_out.lag_p99",
        f"lag, append to its bytes at the client: p99{bound}",
        1000 * harness.percentile(lags, 99),
        "ms",
        at_most(250),
    )


# Scenario 6: a long history ------------------------------------------------------------------


async def history_size(
    workdir: Path, report: Report, database: Callable[[], Awaitable[Path]]
) -> None:
    """A service on 1,000,000 events: start, rebuild, idle memory, and reads under load."""
    db = await database()
    out = await harness.Command(
        "s6-rebuild", ["-m", "service", "rebuild"], workdir, DATABASE_PATH=str(db)
    ).output()
    rebuilt = json.loads(out.strip().splitlines()[-1])
    add = report.add
    add(
        HISTORY,
        "history.events",
        "events in the log",
        rebuilt["events_replayed"],
        "",
        exactly(TOTAL_EVENTS),
    )
    add(
        HISTORY,
        "history.rebuild_rate",
        f"rebuild replay (then {rebuilt['compare_seconds']:.1f} s comparing; equal to live: "
        + str(rebuilt["equal_to_live"]).lower()
        + ")",
        rebuilt["events_per_second"],
        "events/s",
        at_least(50_000),
    )
    async with (
        harness.directory(workdir, 0.0, rate_limit=False, name="s6-directory") as d,
        harness.service(workdir, d.url, db, name="s6-service", **overhead_settings()) as s,
        unlimited() as http,
    ):
        await asyncio.sleep(2.0)
        idle = s.process.memory().rss_mb
        loaded = await under_readers(http, s, d, "History")
    add(HISTORY, "history.ready", "service start to /health 200", s.ready_seconds, "s", at_most(2))
    add(HISTORY, "history.idle_rss", "idle RSS", idle, "MB", at_most(100))
    reads(report, HISTORY, "history", loaded, targets=False)
    add_completed(report, HISTORY, "history", loaded.statuses)
    before = report.value("read_path.progress_p99")
    ratio = None if before is None else loaded.p("progress", 99) / before
    add(
        HISTORY, "history.progress_p99_ratio", "/progress p99 / scenario 4's", ratio, "", at_most(2)
    )
