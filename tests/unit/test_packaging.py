"""An installed package carries every file the service reads at run time."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def test_every_data_file_of_the_package_is_declared_as_package_data() -> None:
    package = PROJECT / "service"
    config = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    declared = {path for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    data = {  # followed links too: service/store/sql is the top-level migrations/ folder
        Path(folder) / name
        for folder, _, names in os.walk(package, followlinks=True)
        if "__pycache__" not in folder
        for name in names
        if not name.endswith((".py", ".pyc"))
    }
    assert data, "the package has data files (migrations, the ReDoc bundle)"
    assert data - declared == set()
    assert {p.name for p in data} >= {"001_event_log.sql", "redoc.standalone.js"}
