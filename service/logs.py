"""The service log: one line a record, whatever it quotes, and one traceback a minute for a
fault that lasts, not one per row."""

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


FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Control characters but tab (C0, DEL, C1) and Unicode's line and paragraph separators, as
# escapes: a directory's answer or a header quoted in a message could otherwise end the line
# and forge the next ("...\n2026-11-30 ... CRITICAL ..."), or send a terminal escape.
ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09} | {
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


class OneLine(logging.Formatter):
    """Each record's message on one line, its control characters escaped; a traceback that
    follows it keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(ESCAPES)
        return super().formatMessage(record)


def configure(level: str) -> None:
    """Log to stderr, one line a record, from `level` up."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLine(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


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
def repeats_held_back() -> Iterator[None]:
    """Hold back repeated errors of the modules a lasting fault floods, while the block runs."""
    repeats = RepeatedErrors()
    loggers = [logging.getLogger(name) for name in FLOODED]
    for logger in loggers:
        logger.addFilter(repeats)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(repeats)
