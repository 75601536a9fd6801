"""The client's result table: every row of a short batch, the failed rows of a long one."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console
from rich.progress import TextColumn
from rich.text import Text

from service.client.display import TABLE_ROWS, Watch, result_table


def status_with(statuses: list[str]) -> dict[str, Any]:
    """A /status body whose rows have these statuses, in order."""
    hospitals = [
        {
            "row": n,
            "name": f"Hospital {n}",
            "address": f"{n} Main St",
            "phone": None,
            "status": status,
            "hospital_id": 100 + n if status in ("created", "deleted") else None,
            "error_message": "refused by the directory" if status == "failed" else None,
        }
        for n, status in enumerate(statuses, start=1)
    ]
    return {"batch_id": "b", "hospitals": hospitals}


def listed_rows(statuses: list[str]) -> tuple[list[str], int]:
    table, left_out = result_table(status_with(statuses))
    return [str(cell) for cell in table.columns[0].cells], left_out


def test_a_batch_of_table_rows_lists_every_row() -> None:
    listed, left_out = listed_rows(["failed"] + ["created"] * (TABLE_ROWS - 1))
    assert (len(listed), left_out) == (TABLE_ROWS, 0)


def test_a_long_batch_lists_its_failed_rows_alone_and_table_rows_of_them_at_most() -> None:
    others = ["created", "created_and_activated", "pending", "deleted"] * (TABLE_ROWS // 4)
    listed, left_out = listed_rows(["failed", *others, "failed"])
    assert listed == ["1", str(len(others) + 2)]
    assert left_out == len(others)

    listed, left_out = listed_rows(["failed"] * (TABLE_ROWS + 1))
    assert listed == [str(n) for n in range(1, TABLE_ROWS + 1)] and left_out == 1


def test_a_value_s_control_characters_reach_the_terminal_as_visible_escapes() -> None:
    status = status_with(["failed"])
    status["hospitals"][0].update(
        name="Evil\x1b[2J\x1b[HHospital",  # clears the screen, then writes over it
        address="1 Main St\x9b31m",  # C1 CSI: the same, in one byte
        phone="\x1b]0;retitled\x07555",  # retitles the window, and hides what follows
        error_message="Line1\r\nLine2\tend",
    )
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(result_table(status)[0])
    shown = out.getvalue()
    assert not set(shown) & {"\x1b", "\x9b", "\x07", "\r"}
    assert "Evil\\x1b[2J\\x1b[HHospital" in shown
    assert "1 Main St\\x9b31m" in shown
    assert "\\x1b]0;retitled\\x07555" in shown
    assert "Line1\\x0d" in shown and "Line2" in shown  # a newline stays a line break


@pytest.mark.parametrize("terminal", [True, False], ids=["bar", "lines"])
def test_what_the_service_says_aside_is_shown_as_written(terminal: bool) -> None:
    # A rollback's error carries the directory's answer: its brackets are not markup (a
    # "[/x]" raised in the bar) and its escape sequences do not reach the terminal.
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200, color_system=None)
    numbers = {
        "processed_hospitals": 3,
        "total_hospitals": 5,
        "processing_status": "processing",
        "failed_hospitals": 0,
        "current_message": "Processing hospital 3/5",
    }
    with Watch(console) as watch:
        watch.show({"progress": numbers})
        watch.aside("Rollback failed: HTTP 500: [/x] [bold]no\x1b[2J")
        column = watch.progress.columns[-1]
        assert isinstance(column, TextColumn)
        shown = column(watch.progress.tasks[0])

    expected = "Rollback failed: HTTP 500: [/x] [bold]no\\x1b[2J"
    if terminal:
        assert isinstance(shown, Text) and shown.plain == expected
    else:
        assert out.getvalue().splitlines()[-1].endswith(f" - {expected}")
