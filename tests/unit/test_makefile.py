"""The Makefile's install: an interpreter older than 3.11 is named before it makes a venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def old_python(tmp_path: Path) -> Path:
    """An interpreter that answers a `-c` check as Python 3.10 does, and does nothing else
    (no venv, no pip), so a Makefile that goes past the check fails without the network."""
    script = tmp_path / "python3.10"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-c" ]; then\n'
        f"  exec {sys.executable} -c \"import sys; sys.version_info = (3, 10, 13, 'final', 0)\n"
        '$2"\n'
        "fi\n"
        'echo "this stand-in of Python 3.10 runs only -c" >&2\n'
        "exit 1\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script


def make(target: str, venv: Path, python: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(PROJECT), target, f"VENV={venv}", f"PYTHON={python}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"PIP_NO_INDEX": "1"},
        check=False,
    )


def test_a_python_older_than_3_11_is_named_before_a_venv_is_made(tmp_path: Path) -> None:
    python = old_python(tmp_path)
    venv = tmp_path / "venv"

    done = make(f"{venv}/bin/python", venv, python)

    assert done.returncode != 0
    assert f"{python} is Python 3.10: 3.11 or newer is needed" in done.stderr
    assert not venv.exists()


def test_a_venv_left_by_an_older_python_says_to_remove_it(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(old_python(tmp_path))

    done = make(f"{venv}/.installed", venv, Path(sys.executable))

    assert done.returncode != 0
    assert f"{venv} holds Python 3.10: 3.11 or newer is needed; remove it" in done.stderr
    assert "pip install" not in done.stdout
