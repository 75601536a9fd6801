"""`python -m service demo`: the local directory and the service, a sample upload followed live.

Both run as child processes in their own sessions, so a Ctrl-C reaches only the demo, which
stops the service first (it closes its websockets and lets creates in flight end) and then
the directory. Their logs go to files next to the demo database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import aiohttp

from service.client import run as run_client
from service.client.cli import INTERRUPTED, REFUSED

SAMPLE = Path("samples") / "hospitals.csv"
PROJECT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 60.0
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)  # a port held by another program never answers
STOP_SECONDS = 20.0  # the service's shutdown_timeout (10 s) and some


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m service demo",
        description="Run the local directory and the service, upload a sample and follow it.",
    )
    parser.add_argument("--port", type=int, default=8000, help="the service's port")
    parser.add_argument("--directory-port", type=int, default=9000, help="the directory's port")
    parser.add_argument(
        "--create-delay", type=float, default=5.0, help="seconds the directory takes per create"
    )
    parser.add_argument("--file", type=Path, default=None, help=f"CSV to upload ({SAMPLE})")
    parser.add_argument("--database", default="data/demo.db", help="the service's database")
    return parser.parse_args(argv)


def sample_file(chosen: Path | None) -> Path:
    """The file to upload: the one given, else the sample here or in the project."""
    if chosen is not None:
        return chosen
    return SAMPLE if SAMPLE.exists() else PROJECT / SAMPLE


@contextlib.asynccontextmanager
async def child(
    name: str, args: list[str], env: dict[str, str], log: IO[bytes]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m service <args>` in its own session, terminated and awaited on the way out."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    print(f"started the {name} (pid {process.pid})", flush=True)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(STOP_SECONDS):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        print(f"stopped the {name} (exit status {process.returncode})", flush=True)


async def wait_ready(
    http: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process
) -> None:
    """Poll `url` until it answers 200; RuntimeError if the process exits or time runs out."""
    async with asyncio.timeout(STARTUP_SECONDS):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"exited with status {process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url, timeout=PROBE_TIMEOUT) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)


def taken(port: int) -> bool:
    """Whether another program listens on the loopback `port`: the demo would talk to it."""
    with socket.socket() as probe:
        # As servers bind: a port left in TIME_WAIT by the last demo is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def demo(args: argparse.Namespace) -> int:
    """Start both, upload and follow, then wait for SIGINT or SIGTERM and stop both.

    The exit status is the upload's (0 once the batch completed), 1 if either could not
    start or stopped on its own, 130 if stopped before the upload ended.
    """
    for option, port in (("--port", args.port), ("--directory-port", args.directory_port)):
        if taken(port):
            print(f"port {port} is in use by another program: choose another with {option}")
            return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    database = Path(args.database)
    database.parent.mkdir(parents=True, exist_ok=True)
    service_url = f"http://127.0.0.1:{args.port}"
    directory_url = f"http://127.0.0.1:{args.directory_port}"
    env = {k: v for k, v in os.environ.items() if k not in ("DIRECTORY_BASE_URL", "APP_HOST")}
    service_env = env | {
        "APP_HOST": "127.0.0.1",
        "APP_PORT": str(args.port),
        "EXTERNAL_API_BASE_URL": directory_url,
        "DATABASE_PATH": str(database),
    }
    directory_args = ["local-directory", "--port", str(args.directory_port)]
    directory_args += ["--create-delay", str(args.create_delay)]
    logs = database.parent
    with (
        (logs / "demo-directory.log").open("ab") as directory_log,
        (logs / "demo-service.log").open("ab") as service_log,
    ):
        print(f"logs: {logs / 'demo-directory.log'}, {logs / 'demo-service.log'}", flush=True)
        async with (
            aiohttp.ClientSession() as http,
            child("local directory", directory_args, env, directory_log) as directory,
            child("service", ["serve"], service_env, service_log) as service,
        ):
            for name, url, process in (
                ("local directory", directory_url + "/", directory),
                ("service", service_url + "/health", service),
            ):
                ready = asyncio.create_task(wait_ready(http, url, process))
                if await _first_done(stop, {ready: name}) is None:
                    return INTERRUPTED
                if (error := ready.exception()) is not None:
                    problem = str(error) or f"no answer within {STARTUP_SECONDS:g} s"
                    print(f"the {name} did not start ({problem}); see its log", file=sys.stderr)
                    return 1
            print(f"local directory: {directory_url}  service: {service_url}", flush=True)
            sample = str(sample_file(args.file))
            upload = asyncio.create_task(
                run_client(["upload", sample, "--url", service_url, "--follow"])
            )
            if await _first_done(stop, {upload: "upload"}) is None:
                print(
                    f"Stopping the demo. Its directory keeps nothing: a batch left unfinished "
                    f"in {database} fails at the next demo on it if a row was created.",
                    flush=True,
                )
                return INTERRUPTED
            if (status := upload.result()) != 0:
                print(f"the upload ended with exit status {status}", flush=True)
            batch = "<batch_id>" if status == REFUSED else "<batch_id above>"
            print(
                f"\nAPI docs:   {service_url}/docs\n"
                f"ReDoc:      {service_url}/redoc\n"
                f"websockets: ws://127.0.0.1:{args.port}/batch/{batch}/ws (one batch), "
                f"ws://127.0.0.1:{args.port}/ws (every batch)\n"
                f"upload:     {shlex.quote(sys.executable)} -m service upload FILE "
                f"--url {service_url} --follow\n"
                "Both keep running; press Ctrl-C to stop them.",
                flush=True,
            )
            children = {"local directory": directory, "service": service}
            ended = await _first_done(
                stop, {asyncio.create_task(p.wait()): name for name, p in children.items()}
            )
            if ended is not None:
                print(f"the {ended} stopped on its own; see its log", file=sys.stderr)
                return 1
            print("stopping...", flush=True)
    return status


async def _first_done(stop: asyncio.Event, tasks: dict[asyncio.Task[Any], str]) -> str | None:
    """Wait for the first of `tasks` to end and say its name, or None if `stop` is set
    first; whatever is left is cancelled."""
    stopping = asyncio.create_task(stop.wait())
    done, pending = await asyncio.wait((stopping, *tasks), return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return next((tasks[task] for task in done if task in tasks), None)


def main(argv: list[str]) -> int:
    """Run the demo; the exit status."""
    return asyncio.run(demo(parse_args(argv)))
