"""The processes a benchmark runs: the local directory and the service, each on its own port.

Both run as `python -m service ...` subprocesses on loopback, as in production, so the
benchmark client never shares an event loop (or a GIL) with the code it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from service.local_directory import DirectoryOptions
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
WINDOW_SECONDS = DirectoryOptions().window_seconds  # the directory's rate-limit window
READY_WITHIN = 30.0

# The service reads these from the environment; the benchmark sets them, nothing inherited.
_SETTING_PREFIXES = ("APP_", "DATABASE_", "DIRECTORY_", "CSV_", "API_", "WEBSOCKET_")
_SETTING_NAMES = ("EXTERNAL_API_BASE_URL", "LOG_LEVEL", "CONFIG_PATH")


@dataclass(frozen=True)
class Memory:
    rss_mb: float  # resident now (VmRSS)
    peak_mb: float  # highest resident since start (VmHWM)


@dataclass(frozen=True)
class Cpu:
    """CPU seconds used so far (user + system), by the whole process and by its main thread."""

    process: float
    main_thread: float

    def __sub__(self, earlier: Cpu) -> Cpu:
        return Cpu(self.process - earlier.process, self.main_thread - earlier.main_thread)


def _cpu_seconds(stat: Path) -> float:
    """utime + stime of a /proc stat file (the fields after the command's closing paren)."""
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Process:
    """A child process run in the directory of its log file, its output in that file."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=log.parent,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.popen.pid

    def memory(self) -> Memory:
        """Resident and peak resident memory from /proc/<pid>/status."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return Memory(fields["VmRSS"], fields["VmHWM"])

    def cpu(self) -> Cpu:
        """CPU used so far; the main thread is the one that runs the event loop."""
        proc = Path(f"/proc/{self.pid}")
        return Cpu(_cpu_seconds(proc / "stat"), _cpu_seconds(proc / f"task/{self.pid}/stat"))

    def check_alive(self) -> None:
        """Raise with the end of its log when the process has exited."""
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self, within: float = 15.0) -> None:
        """SIGTERM (both servers shut down gracefully on it), SIGKILL if it lingers."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + within
        while self.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


async def wait_ready(http: aiohttp.ClientSession, url: str, process: Process) -> None:
    """Poll `url` until it answers 200."""
    deadline = time.monotonic() + READY_WITHIN
    while True:
        process.check_alive()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{process.name} not ready after {READY_WITHIN}s:\n{process.log_tail()}"
            )
        await asyncio.sleep(0.01)


def _clean_env(**settings: str) -> dict[str, str]:
    """The environment without any setting of the service, plus `settings`."""
    # With config.toml named and the processes run outside the checkout, a developer's
    # .env or exported settings never change the figures.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SETTING_PREFIXES) and k not in _SETTING_NAMES
    }
    return {
        **env,
        "CONFIG_PATH": str(REPO / "config.toml"),
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        **settings,
    }


@dataclass
class Directory:
    """The local stand-in with its control surface."""

    url: str
    process: Process

    async def state(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """Request counts, stored hospitals and duplicates."""
        async with http.get(f"{self.url}/_standin/state") as r:
            r.raise_for_status()
            return dict(await r.json())

    async def control(self, http: aiohttp.ClientSession, what: str, body: Any = None) -> None:
        """POST to /_standin/<what> (restart, cold-start, delay)."""
        async with http.post(f"{self.url}/_standin/{what}", json=body) as r:
            r.raise_for_status()


@contextlib.asynccontextmanager
async def directory(
    workdir: Path, delay: float, rate_limit: bool, name: str = "directory"
) -> AsyncIterator[Directory]:
    """The stand-in with `delay` seconds per create, no jitter, limits on or off."""
    port = free_port()
    args = ["-m", "service", "local-directory", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--create-delay", str(delay), "--control", "--log-level", "WARNING"]
    if not rate_limit:
        args.append("--no-rate-limit")
    process = Process(name, args, _clean_env(), workdir / f"{name}.log")
    running = Directory(f"http://127.0.0.1:{port}", process)
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, f"{running.url}/_standin/state", process)
        yield running
    finally:
        await process.stop()


@dataclass
class Service:
    """The service process, and how long it took from spawn to /health 200."""

    url: str
    process: Process
    ready_seconds: float


@contextlib.asynccontextmanager
async def service(
    workdir: Path, directory_url: str, db: Path, name: str = "service", **settings: str
) -> AsyncIterator[Service]:
    """`python -m service serve` on a free port; `settings` are extra SECTION_KEY variables."""
    port = free_port()
    env = _clean_env(
        APP_HOST="127.0.0.1",
        APP_PORT=str(port),
        DATABASE_PATH=str(db),
        EXTERNAL_API_BASE_URL=directory_url,
        LOG_LEVEL="WARNING",
        **settings,
    )
    started = time.perf_counter()
    process = Process(name, ["-m", "service", "serve"], env, workdir / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, f"{url}/health", process)
        yield Service(url, process, time.perf_counter() - started)
    finally:
        await process.stop()


class Command(Process):
    """A command that runs to its end, maybe while other work goes on."""

    def __init__(self, name: str, args: Sequence[str], workdir: Path, **settings: str) -> None:
        super().__init__(name, args, _clean_env(**settings), workdir / f"{name}.log")

    async def output(self) -> str:
        """Wait for the end; its output (raises when it failed)."""
        while self.popen.poll() is None:
            await asyncio.sleep(0.1)
        if self.popen.returncode != 0:
            raise RuntimeError(f"{self.name} failed ({self.popen.returncode}):\n{self.log_tail()}")
        return self.log.read_text()


def cpus() -> int:
    """The CPUs the bench and the processes it starts may run on."""
    return len(os.sched_getaffinity(0))


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (q in 0..100)."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]
