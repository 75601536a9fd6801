"""A writer killed with SIGKILL loses no reported append and leaves no partial one."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from service.projections.rebuild import rebuild

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("append_forever.py")


def run_and_kill(path: Path, lines: int) -> list[int]:
    """Start the writer, read `lines` reported positions, SIGKILL it mid-stream."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, str(WRITER), str(path)], stdout=subprocess.PIPE, text=True, env=env
    ) as writer:
        assert writer.stdout is not None
        reported = [int(writer.stdout.readline()) for _ in range(lines)]
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    assert writer.returncode == -signal.SIGKILL
    return reported


def test_killed_writer_keeps_every_reported_append_whole(tmp_path: Path) -> None:
    path = tmp_path / "events.db"

    reported = run_and_kill(path, lines=60)

    conn = sqlite3.connect(path)
    try:
        stored = {p for (p,) in conn.execute("SELECT global_position FROM events")}
        versions_per_stream = conn.execute(
            "SELECT group_concat(stream_version) FROM "
            "(SELECT stream_id, stream_version FROM events ORDER BY stream_id, stream_version) "
            "GROUP BY stream_id"
        ).fetchall()
    finally:
        conn.close()
    assert set(reported) <= stored
    assert stored == set(range(1, len(stored) + 1))
    assert {v for (v,) in versions_per_stream} == {"0,1,2"}
    assert rebuild(str(path)).equal
