"""The log's last committed position, kept beside the database where a restore of it does
not reach: a log found behind it at start has lost commits (an older copy put in place, a
-wal file deleted after a crash), and the directory may hold what they recorded."""

from __future__ import annotations

import os
from typing import NamedTuple

SUFFIX = ".head"
KEPT, LOST = "kept", "lost"


class Lost(NamedTuple):
    """The log ends at `log_position`, though `committed_position` was committed to it."""

    log_position: int
    committed_position: int


class Marked(NamedTuple):
    position: int
    lost: bool  # a loss was found at this position and is not recorded in the log yet


class HeadMark:
    """`<database>.head`: the database's instance id, the last position committed to it,
    and whether a loss found is still to be recorded.

    Written after commits, never before, and without fsync: a mark that a power cut loses is
    an older one, which can miss a loss but never report one. The instance id ties the mark
    to its database: a new database at the same path has another one.
    """

    def __init__(self, database: str, instance: str) -> None:
        # Beside the file itself, as its lock is: two spellings of one database share it.
        self.path = f"{os.path.realpath(database)}{SUFFIX}"
        self._instance = instance
        self._fd: int | None = None

    def read(self) -> Marked | None:
        """The mark of this database; None without one, or with another database's."""
        try:
            with open(self.path, "rb") as f:
                text = f.read(256).decode("ascii", "replace")
        except FileNotFoundError:
            return None
        match text.split():
            case [instance, position, state] if (
                instance == self._instance and position.isdigit() and state in (KEPT, LOST)
            ):
                return Marked(int(position), state == LOST)
        return None

    def write(self, position: int, lost: bool = False) -> None:
        """Mark `position`: one record of fixed length over the last, so no read sees a mix."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        record = f"{self._instance} {position:20d} {LOST if lost else KEPT}\n"
        os.pwrite(self._fd, record.encode(), 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
