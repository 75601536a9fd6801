"""Fixtures shared by every suite: the local directory and the service, both on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.local_directory import DirectoryOptions, RunningDirectory, run_directory
from tests.integration.chaos import TALLY
from tests.support import CHILDREN, Service, ServiceFactory, fast_settings, running_service


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker, hand the chaos tally to the controller, which prints it."""
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:
        worker_output["chaos_tally"] = dict(TALLY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """Add a finished pytest-xdist worker's chaos tally to the controller's."""
    TALLY.update(node.workeroutput.get("chaos_tally", {}))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print what the chaos suites did (faults injected, kills, duplicates found)."""
    if TALLY:
        terminalreporter.section("chaos tally")
        for what, count in sorted(TALLY.items()):
            terminalreporter.write_line(f"{what}: {count}")


@pytest.fixture(autouse=True)
def no_child_left() -> Iterator[None]:
    """Kill any service child a test left running (one that failed before its stop)."""
    yield
    while CHILDREN:
        child = CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.fixture
async def directory() -> AsyncIterator[RunningDirectory]:
    """The stand-in with short creates (0.2 s) and no rate limit; tests change it as needed."""
    async with run_directory(DirectoryOptions(create_delay=0.2, rate_limit=False)) as running:
        yield running


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "service.db"


@pytest.fixture
def service_factory(directory: RunningDirectory, db_path: Path) -> ServiceFactory:
    """Start (and restart) the service on the test's database with settings overridden."""

    @contextlib.asynccontextmanager
    async def start(**directory_settings: Any) -> AsyncIterator[Service]:
        settings = fast_settings(db_path, directory.url, **directory_settings)
        async with running_service(settings) as service:
            yield service

    return start


@pytest.fixture
async def service(service_factory: ServiceFactory) -> AsyncIterator[Service]:
    async with service_factory() as running:
        yield running
