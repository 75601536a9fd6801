"""A writer killed with SIGKILL loses no reported append and leaves no partial one."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from service.projections.rebuild import rebuild
from tests.integration.conftest import run_sql

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("append_forever.py")


async def run_and_kill(path: Path, lines: int) -> list[int]:
    """Start the writer, read `lines` reported positions, then SIGKILL it mid-stream."""
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert writer.stdout is not None
    try:
        return [int(await asyncio.wait_for(writer.stdout.readline(), 10)) for _ in range(lines)]
    finally:
        writer.send_signal(signal.SIGKILL)
        assert await writer.wait() == -signal.SIGKILL


def log_of(path: Path) -> tuple[set[object], set[object]]:
    """The stored positions, and each stream's versions as '0,1,2'."""
    positions = run_sql(path, "SELECT global_position FROM events")
    versions = run_sql(
        path,
        "SELECT group_concat(stream_version) FROM (SELECT stream_id, stream_version "
        "FROM events ORDER BY stream_id, stream_version) GROUP BY stream_id",
    )
    return {p for (p,) in positions}, {v for (v,) in versions}


async def test_killed_writer_keeps_every_reported_append_whole(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    reported = await run_and_kill(path, lines=60)

    positions, versions = log_of(path)
    assert set(reported) <= positions
    assert positions == set(range(1, len(positions) + 1))
    assert versions == {"0,1,2"}  # every append of three events is whole
    assert rebuild(str(path)).equal
