"""The service log's format, and the filter that logs a lasting fault's traceback once a
minute, not once per row."""

from __future__ import annotations

import logging
import sys

import pytest

from service.logs import FORMAT, OneLine, RepeatedErrors, configure


def record(msg: str, error: Exception | None, *args: object) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error is not None else None
    return logging.LogRecord("service.x", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_an_error_of_one_kind_passes_once_per_period_with_the_count_held_back() -> None:
    now = [0.0]
    repeats = RepeatedErrors(60.0, clock=lambda: now[0])
    full = OSError("database or disk is full")

    passed = [repeats.filter(record("preparing row %s failed", full, n)) for n in range(5)]
    now[0] = 60.0
    later = record("preparing row %s failed", full, 6)

    assert passed == [True, False, False, False, False]
    assert repeats.filter(later)
    assert (
        later.getMessage()
        == "preparing row 6 failed (and 4 more like it since the last one logged)"
    )


def test_other_kinds_and_records_without_an_error_are_not_held_back() -> None:
    repeats = RepeatedErrors(60.0, clock=lambda: 0.0)
    full = OSError("database or disk is full")

    assert repeats.filter(record("preparing row %s failed", full, 1))
    assert repeats.filter(record("creating row %s failed", full, 1))  # another message
    assert repeats.filter(record("preparing row %s failed", OSError("disk I/O error"), 2))
    assert repeats.filter(record("preparing row %s failed", None, 3))  # no traceback
    assert repeats.filter(record("preparing row %s failed", None, 4))


def raised_here() -> Exception:
    try:
        raise KeyError("row")
    except KeyError as caught:
        return caught


def raised_there() -> Exception:
    try:
        raise KeyError("row")
    except KeyError as caught:
        return caught


def test_errors_alike_raised_in_different_places_are_two_kinds() -> None:
    repeats = RepeatedErrors(60.0, clock=lambda: 0.0)

    # One template logs every background task's failure; the task's name is an argument.
    assert repeats.filter(record("%s%s failed", raised_here(), "_record", " of batch a"))
    assert repeats.filter(record("%s%s failed", raised_there(), "_reconcile", " of batch b"))
    assert not repeats.filter(record("%s%s failed", raised_here(), "_record", " of batch c"))


def test_a_quoted_answer_cannot_forge_a_line_or_send_a_terminal_escape() -> None:
    # A directory's 429 `error`, quoted in a WARNING, as a hostile proxy could send it.
    said = "slow down\r\n2026-11-30 18:00:00,000 CRITICAL service.app: \x1b[2Jforged\u2028\x85"
    try:
        raise OSError("disk\nfull")
    except OSError:
        exc_info = sys.exc_info()
    line = logging.LogRecord(
        "service.x", logging.WARNING, __file__, 1, "refused (%s)", (said,), exc_info
    )

    text = OneLine(FORMAT).format(line)

    first, *traceback = text.split("\n")
    assert first.endswith(
        "WARNING service.x: refused (slow down\\x0d\\x0a2026-11-30 18:00:00,000 CRITICAL "
        "service.app: \\x1b[2Jforged\\u2028\\x85)"
    )
    assert traceback[0] == "Traceback (most recent call last):"  # a traceback keeps its lines
    assert OneLine(FORMAT).format(record("a\tb", None)).endswith(": a\tb")  # a tab stays


def test_the_service_logs_one_line_a_record(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a process that has not logged yet
    monkeypatch.setattr(root, "level", root.level)

    configure("info")

    assert [type(h.formatter) for h in root.handlers] == [OneLine]
    assert root.level == logging.INFO
