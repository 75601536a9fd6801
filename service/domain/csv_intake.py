"""CSV intake: turn an uploaded file into rows, or into every problem it has, with places."""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from service.domain.events import Row

REQUIRED = ("name", "address")
MAX_BLANK_LINES = 10_000  # skipped lines a file may hold (spreadsheets export empty rows)
MAX_VALUE = 131_072  # characters a value may hold (the csv module's default field limit)
# The reader takes one character more, for the ' an export puts before a formula-like value:
# a value at the limit goes back in as it came out. The reader stops at its limit, so a
# file of one huge value (an unclosed quote, often) is not read and held whole.
csv.field_size_limit(MAX_VALUE + 1)
COLUMNS = ("name", "address", "phone")
HEADERS_MESSAGE = "CSV headers must be exactly: name,address,phone"

Problem = dict[str, Any]


def problem(loc: list[str | int], msg: str, kind: str) -> Problem:
    """One entry of a validation answer, in the shape FastAPI users know."""
    return {"loc": loc, "msg": msg, "type": kind}


class CsvRejected(Exception):
    """The file cannot be accepted; `problems` lists every reason with its place."""

    status = 422

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems[0]["msg"] if problems else "invalid CSV")
        self.problems = problems


def _rejected(loc: list[str | int], msg: str, kind: str) -> CsvRejected:
    """A refusal of the whole file for one problem at one place."""
    return CsvRejected([problem(loc, msg, kind)])


@dataclass(frozen=True)
class ParsedCsv:
    rows: tuple[Row, ...]
    headers: tuple[str, ...]
    warnings: list[Problem] = field(default_factory=list)


def check_filename(filename: str | None) -> None:
    """Refuse a file whose name does not say it is a CSV."""
    if not filename or not filename.lower().endswith(".csv"):
        raise _rejected(
            ["file", "filename"],
            f"the file must be a .csv file, got {filename or 'no file name'!r}",
            "file_type_error",
        )


def decode(data: bytes) -> str:
    """UTF-8 with or without BOM; anything else is refused, saying where it breaks."""
    if b"\x00" in data:
        line, _ = _place(data, data.index(b"\x00"))
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise _rejected(
            ["file", "encoding"],
            f"the file contains NUL bytes from line {line}: it is not a UTF-8 text CSV{hint}",
            "encoding_error",
        )
    # Strip the BOM ourselves: "utf-8-sig" reports error offsets without it, 3 bytes short.
    body = data.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, line_start = _place(body, exc.start)
        column = len(body[line_start : exc.start].decode("utf-8")) + 1
        raise _rejected(
            ["file", "encoding"],
            f"the file is not valid UTF-8: byte 0x{body[exc.start]:02x} at line {line}, "
            f"column {column}; save it as UTF-8 (CSV UTF-8 in a spreadsheet)",
            "encoding_error",
        ) from exc


def _place(data: bytes, at: int) -> tuple[int, int]:
    """The line of byte `at` and the offset where that line starts; lines end as the CSV
    reader ends them, at CR LF, LF or CR alone."""
    before = data[:at]
    line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
    return line, max(before.rfind(b"\n"), before.rfind(b"\r")) + 1


# A value starting with one of these, after any quotes ('), is prefixed with one more ' by
# the results export, so that a spreadsheet shows it instead of computing it; intake takes
# that ' off again, so an exported value comes back as it was.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def formula_like(value: str) -> bool:
    """Whether the export quotes `value` (and intake unquotes it once)."""
    return value.lstrip("'")[:1] in FORMULA_STARTS


def escaped(value: object) -> str:
    """A value as the results export writes it: a spreadsheet must show it, not run it.

    Phone numbers too: a spreadsheet computes +1-555-0100 as -654, and saves that back.
    """
    text = "" if value is None else str(value)
    return "'" + text if formula_like(text) else text


def unescaped(cell: str) -> str:
    """The value a results export wrote as `cell`."""
    return cell[1:] if cell.startswith("'") and formula_like(cell) else cell


def _records(text: str) -> Iterator[tuple[int, list[str]]]:
    """(first line of the record, cells) for each record, blank lines skipped (up to
    MAX_BLANK_LINES of them: a file of nothing else would otherwise be read to its end)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    line, blank, before_header = 1, 0, True
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _rejected(
                ["file", "content"], _parse_error(exc, line, reader.line_num), "csv_parse_error"
            ) from exc
        if any(cell.strip() for cell in cells):
            before_header = False
            yield line, cells
        elif (blank := blank + 1) > MAX_BLANK_LINES:
            if before_header:  # the allowance is for lines after the header
                raise _missing_headers()
            raise _rejected(
                ["file", "content"],
                f"the file has more than {MAX_BLANK_LINES:,} lines without values "
                f"(line {line} is one): remove the empty rows",
                "too_many_blank_lines",
            )
        line = reader.line_num + 1


def _missing_headers() -> CsvRejected:
    return _rejected(
        ["file", "headers"],
        f"the first line must be the header {','.join(COLUMNS)}; the file starts with blank lines",
        "missing_headers",
    )


def _parse_error(exc: csv.Error, first: int, last: int) -> str:
    """Place a parse error at the record's first line: an unclosed quote runs on to the end."""
    if str(exc).startswith("field larger than field limit"):
        return _too_long(first)
    if last <= first:
        return f"line {first}: {exc}"
    return (
        f"lines {first}-{last}: {exc}; the record starting on line {first} runs over "
        f"{last - first + 1} lines: check that its quotes are closed"
    )


def _too_long(line: int) -> str:
    return f"line {line}: a value is longer than {MAX_VALUE:,} characters"


def _headers(cells: list[str]) -> tuple[str, ...]:
    names = _names(cells)
    if not _valid(names):
        shown = ",".join(cells[:10]) + (f",... ({len(cells)} columns)" if len(cells) > 10 else "")
        said = f"{HEADERS_MESSAGE} (phone optional, any order); found: {shown[:300]}"
        # A spreadsheet set to another locale saves "CSV" with semicolons or tabs.
        if len(cells) == 1 and (sep := next(_other_separators(cells[0]), None)) is not None:
            said += f" (values separated by {sep!r}: save the file with commas between them)"
        raise _rejected(["file", "headers"], said, "invalid_headers")
    return names


def _names(cells: list[str]) -> tuple[str, ...]:
    return tuple(cell.strip().lower() for cell in cells)


def _valid(names: tuple[str, ...]) -> bool:
    unique = len(set(names)) == len(names)
    return unique and set(REQUIRED) <= set(names) and set(names) <= set(COLUMNS)


def _other_separators(header: str) -> Iterator[str]:
    """The separators other than a comma that would make `header` a valid one."""
    return (sep for sep in (";", "\t", "|") if _valid(_names(header.split(sep))))


def parse(text: str, max_rows: int) -> ParsedCsv:
    """Validate the file; raise CsvRejected with every problem found (up to the first row
    past `max_rows`, as the file is refused then whatever else it holds)."""
    records = _records(text)
    first = next(records, None)
    if first is None:
        raise _rejected(["file", "content"], "the file is empty: no header, no rows", "empty_file")
    header_line, header_cells = first
    if header_line != 1:
        raise _missing_headers()
    headers = _headers(header_cells)
    name, address = headers.index("name"), headers.index("address")
    phone = headers.index("phone") if "phone" in headers else None
    rows: list[Row] = []
    problems: list[Problem] = []
    seen: dict[tuple[str, str, str | None], int] = {}
    warnings: list[Problem] = []
    count = 0
    try:
        for line, raw in records:
            count += 1
            if count > max_rows:  # refused whatever the rest holds: read no further
                break
            if len(raw) != len(headers):  # before its cells are copied: it may have millions
                problems.append(
                    problem(
                        ["row", count],
                        f"row {count} (line {line}) has {_values(len(raw))}, "
                        f"expected {len(headers)} ({','.join(headers)})",
                        "wrong_column_count",
                    )
                )
                continue
            cells = [unescaped(cell.strip()) for cell in raw]
            if any(len(cell) > MAX_VALUE for cell in cells):  # ends the reading, as csv's limit
                raise _rejected(["file", "content"], _too_long(line), "csv_parse_error")
            if not (cells[name] and cells[address]):
                problems.extend(_missing(cells, headers, count, line))
            row = Row(
                count,
                cells[name],
                cells[address],
                cells[phone] or None if phone is not None else None,
                line,
            )
            key = (row.name, row.address, row.phone)
            if key in seen:
                warnings.append(
                    problem(
                        ["row", count],
                        f"row {count} (line {line}) repeats row {seen[key]}: both will be created",
                        "duplicate_row",
                    )
                )
            seen.setdefault(key, count)
            rows.append(row)
    except CsvRejected as exc:  # a record that cannot be read: after the problems before it
        raise CsvRejected(problems + exc.problems) from exc
    if count == 0:
        problems.append(
            problem(["file", "content"], "the file has a header but no data rows", "empty_file")
        )
    if count > max_rows:
        problems.insert(
            0,
            problem(
                ["file", "content"],
                f"the file has more than {max_rows} data rows; at most {max_rows} are allowed "
                "per upload",
                "too_many_rows",
            ),
        )
    if problems:
        raise CsvRejected(problems)
    return ParsedCsv(tuple(rows), headers, warnings)


def _values(count: int) -> str:
    return f"{count} value" if count == 1 else f"{count} values"


def _missing(cells: list[str], headers: tuple[str, ...], count: int, line: int) -> list[Problem]:
    return [
        problem(
            ["row", count, column],
            f"{column} is required and must be at least 1 character (row {count}, line {line})",
            "value_error",
        )
        for column in REQUIRED
        if not cells[headers.index(column)]
    ]


def parse_upload(filename: str | None, data: bytes, max_rows: int) -> ParsedCsv:
    """All the checks of an uploaded file, in the order a user would fix them."""
    check_filename(filename)
    return parse(decode(data), max_rows)
