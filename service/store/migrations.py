"""Numbered .sql migrations, applied in order at start and recorded in a table."""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

# The migrations/ folder at the top of the project, through the link service/store/sql:
# the link puts the files inside the package, so that a wheel carries them.
MIGRATIONS_DIR = Path(__file__).parent / "sql"
FILE_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
MIN_SQLITE = (3, 35, 0)


class MigrationError(RuntimeError):
    """The database cannot be brought to the schema this code expects."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files of `directory`, in version order."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file name {path.name} is not NNN_name.sql")
        found.append(Migration(int(match[1]), path.stem, path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


def check_sqlite_version(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Refuse an SQLite too old for the features the store relies on."""
    if version < MIN_SQLITE:
        wanted = ".".join(map(str, MIN_SQLITE))
        found = ".".join(map(str, version))
        raise MigrationError(f"SQLite {wanted} or newer is required, found {found}")
    try:  # /status rows are built by json_group_array: built in from 3.38, optional before
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            conn.execute("SELECT json_group_array(json_object('a', 1))")
    except sqlite3.OperationalError as exc:
        raise MigrationError(f"SQLite's JSON functions are required: {exc}") from None


def migrate(conn: sqlite3.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the missing migrations, each in its own transaction; return their versions."""
    migrations = discover() if migrations is None else migrations
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    applied = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
    newest_known = max((m.version for m in migrations), default=0)
    if applied and max(applied) > newest_known:
        raise MigrationError(
            f"the database is at schema version {max(applied)}, newer than this code "
            f"({newest_known}): upgrade the service or use another DATABASE_PATH"
        )
    done = []
    for m in migrations:
        if m.version in applied:
            continue
        now = datetime.now(UTC).isoformat()
        record = (
            "INSERT INTO schema_migrations (version, name, applied_at) "
            f"VALUES ({m.version}, '{m.name}', '{now}');"
        )
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{m.sql}\n{record}\nCOMMIT;")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.rollback()
            raise MigrationError(f"migration {m.name} failed: {exc}") from exc
        log.info("applied migration %s", m.name)
        done.append(m.version)
    return done
