"""One writing process per database: two would append to the same streams."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class DatabaseInUse(RuntimeError):
    """Another process holds the database's lock."""


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Hold `<path>.lock` while the block runs; the kernel lets go if the process dies."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Beside the file itself: two spellings of one database (a link, ../) share one lock.
    fd = os.open(f"{os.path.realpath(path)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatabaseInUse(
                f"the database {path} is in use by another process (a running service, or a "
                "rebuild): stop it first, or set DATABASE_PATH to another file"
            ) from None
        yield
    finally:
        os.close(fd)
