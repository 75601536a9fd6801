"""The client's result table: every row of a short batch, the failed rows of a long one."""

from __future__ import annotations

from typing import Any

from service.client.display import TABLE_ROWS, result_table


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
