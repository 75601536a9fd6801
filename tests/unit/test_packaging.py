"""An installed package carries every file the service reads at run time."""

from __future__ import annotations

import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def test_every_data_file_of_the_package_is_declared_as_package_data() -> None:
    package = PROJECT / "service"
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    declared = {path for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    data = {
        path
        for path in package.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    assert data, "the package has data files (migrations, the ReDoc bundle)"
    assert data - declared == set()
    assert {p.name for p in data} >= {"001_event_log.sql", "redoc.standalone.js"}
