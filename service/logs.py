"""Logging for faults that last: one traceback a minute, not one per row."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

REPEAT_SECONDS = 60.0
KINDS = 1_000  # kinds of error remembered at most; past it, every kind is new again

# Where a lasting fault strikes once per row, commit or request: a full disk logged 29,000
# lines in 20 s for one 1,000-row batch, and each upload meanwhile its 500's traceback.
FLOODED = ("service.processing.processor", "service.store.event_store", "service.web.errors")


class RepeatedErrors(logging.Filter):
    """Let an error with a traceback through once per `seconds` for each kind (its message
    template, its exception and the line that raised it), and count the ones held back into
    the next that passes."""

    def __init__(
        self, seconds: float = REPEAT_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._seconds, self._clock = seconds, clock
        self._held: dict[tuple[object, ...], tuple[float, int]] = {}  # until, held back

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        kind = (str(record.msg), type(error), str(error), _raised_at(error))
        now = self._clock()
        until, held = self._held.get(kind, (now, 0))
        if now < until:
            self._held[kind] = (until, held + 1)
            return False
        if len(self._held) >= KINDS:
            self._held.clear()
        self._held[kind] = (now + self._seconds, 0)
        if held:
            record.msg = f"{record.msg} (and {held} more like it since the last one logged)"
        return True


def _raised_at(error: BaseException) -> tuple[str, int] | None:
    """Where `error` was raised: one template ("%s%s failed") logs every task's failures,
    and an AssertionError says nothing of which assert it was."""
    if (tb := error.__traceback__) is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename, tb.tb_lineno


@contextlib.contextmanager
def repeats_held_back(seconds: float = REPEAT_SECONDS) -> Iterator[None]:
    """Hold back repeated errors of the modules a lasting fault floods, while the block runs."""
    repeats = RepeatedErrors(seconds)
    loggers = [logging.getLogger(name) for name in FLOODED]
    for logger in loggers:
        logger.addFilter(repeats)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(repeats)
