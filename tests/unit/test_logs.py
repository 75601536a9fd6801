"""The filter that logs a lasting fault's traceback once a minute, not once per row."""

from __future__ import annotations

import logging

from service.logs import RepeatedErrors


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
