"""What the client shows: a live progress bar on a terminal, plain lines otherwise, and results."""

from __future__ import annotations

import time
from datetime import timedelta
from types import TracebackType
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.table import Table
from rich.text import Text

STATUS_STYLES = {
    "completed": "green",
    "created_and_activated": "green",
    "created": "cyan",
    "partially_completed": "yellow",
    "failed": "red",
    "deleted": "magenta",
}


LONGEST_ETA = timedelta.max.total_seconds() // 2  # an ETA past it shows as unknown
MOST_ROWS = 2**53  # a count past it is none the client can compute a rate or an ETA with
UNWRAPPED = 10_000  # columns offered to a table that is not printed on a terminal
TABLE_ROWS = 1_000  # rows a result table lists; a longer batch's lists its failed rows
# Control characters but tab and newline, as escapes: a value's ESC or CSI sequence, sent
# to a terminal as it is, would clear the screen, move the cursor or retitle the window.
CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n"}


def visible(text: str) -> str:
    """Text from the service (a row's values, a directory's answer) fit for a terminal."""
    return text.translate(CONTROLS)


def known(value: Any) -> str:
    """A value the service sent as the client shows it: `?` for one missing or null."""
    return "?" if value is None else str(value)


def count(value: Any) -> int | None:
    """A count the service sent, or None (shown as `?`) for anything but a whole number
    from 0 to MOST_ROWS: the bar and the summary compute with it."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    return value if whole and 0 <= value <= MOST_ROWS else None


def said(value: Any) -> str:
    """Text the service sent, fit for a terminal, `?` when missing."""
    return visible(known(value))


def rows_per_second(task: Task) -> float | None:
    """Rows finished since following began over the time since: steady under bursts. At
    most the pace the service keeps to, as a paced file's first window goes out at once.

    (rich's own speed spans only its update samples, so three rows ending together read
    as thousands a minute.)
    """
    done, elapsed = task.completed - float(task.fields["initial"]), task.elapsed
    if done <= 0 or not elapsed:
        return None
    rate, most = done / elapsed, float(task.fields["most_per_second"])
    return min(rate, most) if most else rate


class RateColumn(ProgressColumn):
    """Rows finished per minute."""

    def render(self, task: Task) -> Text:
        rate = rows_per_second(task)
        return Text("-- rows/min" if rate is None else f"{rate * 60:.1f} rows/min")


class EtaColumn(ProgressColumn):
    """Time left at the rate so far."""

    def render(self, task: Task) -> Text:
        rate = rows_per_second(task)
        if task.total is None or rate is None:
            return Text("ETA -:--:--", style="progress.remaining")
        seconds = (task.total - task.completed) / rate
        if not abs(seconds) < LONGEST_ETA:  # none a timedelta holds
            return Text("ETA -:--:--", style="progress.remaining")
        left = timedelta(seconds=round(seconds))
        return Text(f"ETA {left}", style="progress.remaining")


class Watch:
    """One batch's progress: rich's bar on a terminal, a line per change otherwise.

    Both ways read rows done, failed, rate and ETA from the same rich task.
    """

    def __init__(self, console: Console, creates_per_minute: int = 0) -> None:
        """`creates_per_minute` caps the rate (0: not paced)."""
        self.console = console
        self.most_per_second = creates_per_minute / 60
        self.live = console.is_terminal
        self.rate, self.eta = RateColumn(), EtaColumn()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            self.rate,
            self.eta,
            TextColumn("[dim]{task.fields[aside]}"),
            console=console,
            disable=not self.live,
        )
        self.task: TaskID | None = None
        self.said = ""  # the current_message of the last websocket message
        self.last_line: tuple[str, int | None, int | None, int | None, str] | None = None

    def __enter__(self) -> Watch:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def show(self, message: dict[str, Any]) -> None:
        """Take one websocket message's progress numbers (a null one leaves the bar's as it
        was, and shows as `?` in a line)."""
        numbers = message["progress"]
        done = count(numbers.get("processed_hospitals"))
        total = count(numbers.get("total_hospitals"))
        failed = count(numbers.get("failed_hospitals"))
        status = said(numbers.get("processing_status"))
        if self.task is None:
            self.task = self.progress.add_task(
                escape(status),  # the description column reads markup
                total=total,
                completed=done or 0,
                failed=known(failed),
                initial=done or 0,
                most_per_second=self.most_per_second,
                aside="",
            )
        else:
            self.progress.update(
                self.task,
                description=escape(status),
                total=total,
                completed=done,
                failed=known(failed),
                aside="",
            )
        self.said = str(numbers.get("current_message") or "")
        if not self.live:
            self._line(status, done, total, failed, self.said)

    def aside(self, text: str) -> None:
        """What the service says while no event comes, when it says more than the last one
        (and no longer, once it says that again: a wait that ended)."""
        if self.task is None:
            return
        if self.live:  # the column reads its text as markup: a "[/x]" in it would raise
            self.progress.update(
                self.task, aside="" if text == self.said else escape(visible(text))
            )
        elif self.last_line is not None:
            self._line(*self.last_line[:-1], text)

    def _line(
        self, status: str, done: int | None, total: int | None, failed: int | None, text: str
    ) -> None:
        if (status, done, total, failed, text) == self.last_line:  # a new message is news too
            return
        self.last_line = (status, done, total, failed, text)
        assert self.task is not None
        task = next(t for t in self.progress.tasks if t.id == self.task)
        rate, eta = self.rate.render(task).plain, self.eta.render(task).plain
        self.console.print(
            f"{time.strftime('%H:%M:%S')} {status} {known(done)}/{known(total)} done, "
            f"{known(failed)} failed, "
            f"{rate}, {eta} - {visible(text)}",
            markup=False,
            highlight=False,
        )

    def note(self, text: str) -> None:
        """A line above the bar (or among the lines): reconnects and the like."""
        self.console.print(Text(visible(text), style="dim"))


def _styled(value: str) -> Text:
    return Text(value, style=STATUS_STYLES.get(value, ""))


def _shown(value: Any, style: str = "") -> Text:
    """A row's value as the table shows it: as it is, its control characters made visible."""
    return Text(visible("" if value is None else str(value)), style=style)


def result_table(status: dict[str, Any]) -> tuple[Table, int]:
    """Every row's result, and how many rows it leaves out: a batch of more than TABLE_ROWS
    shows its failed rows alone (20,000 rows took the client 9 s and 180 MB to lay out)."""
    listed = status.get("hospitals")
    # Rows that are not objects (a proxy's or a hostile server's) are left out as unknown.
    every = listed if isinstance(listed, list) else []
    rows = [r for r in every if isinstance(r, dict)]
    if len(every) > TABLE_ROWS:
        rows = [r for r in rows if r.get("status") == "failed"][:TABLE_ROWS]
    title = Text(f"Batch {said(status.get('batch_id'))}")  # Text: a title string is markup
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left")
    for column in ("Row", "Name", "Address", "Phone", "Status", "Hospital ID", "Error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            _shown(row.get("row")),
            _shown(row.get("name")),
            _shown(row.get("address")),
            _shown(row.get("phone")),
            _styled(said(row.get("status"))),
            _shown(row.get("hospital_id")),
            _shown(row.get("error_message"), style="red"),
        )
    return table, len(every) - len(rows)


def print_table(console: Console, table: Table) -> None:
    """A table as wide as it needs off a terminal (logs, pipes); fitted to the terminal on one."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(UNWRAPPED)).maximum
    width, console.width = console.width, max(console.width, natural)
    try:
        console.print(table)
    finally:
        console.width = width


def summary(status: dict[str, Any]) -> Text:
    """One line: how the batch ended (`?` for what the service left null)."""
    ended = said(status.get("processing_status"))
    processed = count(status.get("processed_hospitals"))
    failed = count(status.get("failed_hospitals"))
    deleted = count(status.get("deleted_hospitals")) or 0
    seconds = status.get("processing_time_seconds")
    if not isinstance(seconds, float):
        whole = count(seconds)
        seconds = None if whole is None else float(whole)
    created = None if processed is None or failed is None else processed - failed - deleted
    activated = status.get("batch_activated")
    line = Text(ended, style=STATUS_STYLES.get(ended, ""))
    line.append(
        f": {known(created)} created, {known(failed)} failed, {deleted} deleted of "
        f"{known(count(status.get('total_hospitals')))}; "
        f"activated: {'?' if activated is None else 'yes' if activated else 'no'}; "
        f"{'?' if seconds is None else f'{seconds:.1f}'} s"
    )
    return line
