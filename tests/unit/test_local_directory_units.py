"""The stand-in's pure parts: UUID refusals, fixed windows, fault rules and storage."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import pytest

from service.local_directory.cli import parse_args
from service.local_directory.faults import FaultPlan, FaultRule
from service.local_directory.rate_limit import FixedWindowLimiter
from service.local_directory.storage import HospitalStore, NewHospital
from service.local_directory.uuid_parsing import parse_uuid

CANONICAL = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"


@pytest.mark.parametrize(
    "text",
    [
        CANONICAL,
        CANONICAL.upper(),
        CANONICAL.replace("-", ""),
        "{" + CANONICAL + "}",
        "urn:uuid:" + CANONICAL,
    ],
)
def test_the_four_shapes_pydantic_accepts(text: str) -> None:
    assert parse_uuid(text) == UUID(CANONICAL)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "xyz",
            "invalid character: expected an optional prefix of `urn:uuid:` followed by "
            "[0-9a-fA-F-], found `x` at 1",
        ),
        (
            "{3f2504e0-4f89-11d3-9a0c-0305e82c330g}",
            "invalid character: expected an optional prefix of `urn:uuid:` followed by "
            "[0-9a-fA-F-], found `g` at 37",
        ),
        ("3f2504e0", "invalid length: expected length 32 for simple format, found 8"),
        ("", "invalid length: expected length 32 for simple format, found 0"),
        ("3f2504e0-4f89-11d3-9a0c", "invalid group count: expected 5, found 4"),
        (
            "3f2504e-04f89-11d3-9a0c-0305e82c3301",
            "invalid group length in group 0: expected 8, found 7",
        ),
        (
            "3f2504e0-4f89-11d3-9a0c-0305e82c33011",
            "invalid group length in group 4: expected 12, found 13",
        ),
        # Python's UUID() would take this one: hyphens in the wrong places.
        (
            "3f2504e04f89-11d3-9a0c-0305-e82c3301",
            "invalid group length in group 0: expected 8, found 12",
        ),
    ],
)
def test_refusals_carry_the_uuid_crate_message(text: str, reason: str) -> None:
    assert parse_uuid(text) == reason


def test_a_window_refuses_beyond_its_limit_and_reopens_whole() -> None:
    now = [0.0]
    limiter = FixedWindowLimiter(60.0, clock=lambda: now[0])

    assert [limiter.allow("k", 2) for _ in range(3)] == [True, True, False]
    now[0] = 59.9
    assert limiter.allow("k", 2) is False
    assert limiter.allow("other", 2) is True
    now[0] = 60.0
    assert [limiter.allow("k", 2) for _ in range(3)] == [True, True, False]


def test_reset_reopens_every_window() -> None:
    limiter = FixedWindowLimiter(60.0, clock=lambda: 0.0)
    limiter.allow("k", 1)

    limiter.reset()

    assert limiter.allow("k", 1) is True


def test_every_rule_of_an_endpoint_counts_each_request() -> None:
    plan = FaultPlan()
    plan.add(FaultRule("create", "500", nth=frozenset({1})))
    plan.add(FaultRule("create", "502", nth=frozenset({2})))
    plan.add(FaultRule("root", "504"))

    assert [plan.strike("create") for _ in range(3)] == ["500", "502", None]
    assert plan.strike("root") == "504"


@pytest.mark.parametrize(
    "arguments",
    [
        {"endpoint": "health", "kind": "500"},
        {"endpoint": "create", "kind": "418"},
        {"endpoint": "create", "kind": "500", "probability": 1.5},
        {"endpoint": "create", "kind": "500", "probability": 0.5, "nth": frozenset({1})},
        {"endpoint": "create", "kind": "500", "nth": frozenset({0})},
    ],
)
def test_malformed_rules_are_refused(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FaultRule(**arguments)


def test_store_drops_the_oldest_and_restarts_ids_when_cleared() -> None:
    store = HospitalStore(capacity=2)
    for name in "ABC":
        store.add(NewHospital(name, "x", None, None))

    assert [(h.id, h.name) for h in store.all()] == [(2, "B"), (3, "C")]
    store.clear()
    assert store.add(NewHospital("D", "x", None, None)).id == 1


def test_batch_members_follow_eviction_and_deletes() -> None:
    store = HospitalStore(capacity=3)
    for name, batch in (("A", "b1"), ("B", "b1"), ("C", "b2"), ("D", "b1")):
        store.add(NewHospital(name, "x", None, batch))

    assert [h.name for h in store.batch("b1")] == ["B", "D"]  # A was evicted, oldest first
    assert store.delete(2)
    assert not store.delete(2)
    assert [h.name for h in store.batch("b1")] == ["D"]
    assert store.delete_batch("b1") == 1
    assert store.batch("b1") == []
    assert store.batch_totals() == {"b2": 1}


def test_duplicates_only_count_rows_of_the_same_batch() -> None:
    store = HospitalStore(capacity=10)
    for batch in ("b1", "b1", "b2", None, None):
        store.add(NewHospital("Same", "x", "1", batch))

    assert store.duplicates() == [
        {"creation_batch_id": "b1", "name": "Same", "address": "x", "phone": "1", "count": 2}
    ]
    assert store.batch_totals() == {"b1": 2, "b2": 1}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--handlers", "0"], "argument --handlers: must be at least 1, got 0"),  # hung before
        (["--handlers", "x"], "argument --handlers: must be a whole number, got 'x'"),
        (["--port", "99999"], "argument --port: must be 0-65535, got 99999"),  # a traceback
        (["--create-delay", "-1"], "argument --create-delay: must be at least 0, got -1"),
        (["--jitter", "nan"], "argument --jitter: must be at least 0, got nan"),
        (["--create-delay", "inf"], "argument --create-delay: must be at least 0, got inf"),
    ],
)
def test_command_line_values_out_of_range_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().endswith(message)


def test_command_line_defaults_are_the_directory_s() -> None:
    args = parse_args([])
    assert (args.port, args.handlers, args.create_delay, args.jitter) == (9000, 40, 5.0, 0.0)
