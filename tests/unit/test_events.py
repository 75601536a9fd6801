"""The event catalogue: JSON round trips, upcasting of old payloads, deterministic ids."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.domain import events as ev

ONE_OF_EACH: list[ev.Event] = [
    ev.BatchCreated(
        batch_id="b1",
        file_name="hospitals.csv",
        rows=(
            ev.Row(1, "St Mary", "1 Main St", "555-0100", 2),
            ev.Row(2, "St John", "2 Elm", None, 3),
        ),
        upstream_batches=(ev.UpstreamBatch("b1", (1, 2)),),
        content_sha256="abc",
        idempotency_key="key-1",
    ),
    ev.HospitalRequested(rows=(1, 2), attempts=(2, 1)),
    ev.LogLossDetected(rows=(2,), attempts=(1,), log_position=7, committed_position=9),
    ev.HospitalCreated(row=1, hospital_id=42, reconciled=True),
    ev.HospitalFailed(row=2, reason="rejected", message="name is required", retryable=False),
    ev.HospitalRetryScheduled(row=2, attempt=1, reason="server_error", message="503"),
    ev.BatchActivated(activated_count=1, upstream_batch_ids=("b1",)),
    ev.BatchActivationFailed(reason="not confirmed"),
    ev.BatchResumed(rows=(2,)),
    ev.BatchRollbackRequested(),
    ev.BatchRollbackFailed(reason="HTTP 503"),
    ev.BatchRolledBack(deleted_count=1, upstream_batch_ids=("b1",)),
]


def test_every_event_type_has_a_round_trip_sample() -> None:
    assert sorted(type(e).type_name for e in ONE_OF_EACH) == sorted(ev.EVENT_TYPES)


@pytest.mark.parametrize("event", ONE_OF_EACH, ids=lambda e: e.type_name)
def test_json_round_trip(event: ev.Event) -> None:
    stored = json.loads(json.dumps(event.payload()))

    assert ev.decode(event.type_name, event.schema_version, stored) == event


def test_a_batch_created_payload_is_every_field_as_json_would_read_it() -> None:
    (created,) = (e for e in ONE_OF_EACH if isinstance(e, ev.BatchCreated))

    assert created.payload() == json.loads(json.dumps(dataclasses.asdict(created)))


def test_type_names_are_stable_names_not_import_paths() -> None:
    for name, cls in ev.EVENT_TYPES.items():
        assert cls.type_name == name == cls.__name__
        assert "." not in name


@dataclass(frozen=True)
class NoteAdded(ev.Event):
    """A test event at schema v3: v1 called `text` `note`, v2 added `author`."""

    type_name = "NoteAdded"
    schema_version = 3
    text: str
    author: str
    pinned: bool


@pytest.fixture
def note_added(monkeypatch: pytest.MonkeyPatch) -> None:
    """NoteAdded and its upcasters registered for one test."""
    monkeypatch.setitem(ev.EVENT_TYPES, "NoteAdded", NoteAdded)
    monkeypatch.setitem(
        ev.UPCASTERS, ("NoteAdded", 1), lambda p: {"text": p["note"], "author": "unknown"}
    )
    monkeypatch.setitem(ev.UPCASTERS, ("NoteAdded", 2), lambda p: {**p, "pinned": False})


@pytest.mark.usefixtures("note_added")
@pytest.mark.parametrize(
    ("version", "payload"),
    [
        (1, {"note": "hi"}),
        (2, {"text": "hi", "author": "unknown"}),
        (3, {"text": "hi", "author": "unknown", "pinned": False}),
    ],
)
def test_old_payloads_are_upcast_step_by_step(version: int, payload: ev.Payload) -> None:
    assert ev.decode("NoteAdded", version, payload) == NoteAdded("hi", "unknown", False)


@pytest.mark.usefixtures("note_added")
def test_a_missing_upcaster_is_an_unknown_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(ev.UPCASTERS, ("NoteAdded", 1))

    with pytest.raises(ev.UnknownEventError, match="no upcaster for NoteAdded v1"):
        ev.decode("NoteAdded", 1, {"note": "hi"})


def test_a_version_1_intent_reads_as_version_2_with_one_row() -> None:
    old = {"row": 3, "creation_batch_id": "b1", "attempt": 2}

    assert ev.decode("HospitalRequested", 1, old) == ev.HospitalRequested((3,), (2,))


def test_an_intent_needs_one_attempt_per_row() -> None:
    with pytest.raises(ValueError, match="one attempt per row"):
        ev.HospitalRequested((1, 2), (1,))


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(ev.UnknownEventError, match="unknown event type 'HospitalMoved'"):
        ev.decode("HospitalMoved", 1, {})


@pytest.mark.parametrize(
    ("type_name", "payload"),
    [
        ("BatchRollbackRequested", {"reason": "a field added without a new version"}),
        ("HospitalFailed", {"row": 1, "reason": "rejected", "message": "no"}),  # one missing
        (
            "BatchCreated",
            {
                "batch_id": "b1",
                "file_name": "f.csv",
                "rows": [{"row": 1, "name": "n", "address": "a", "phone": None, "line": 2, "x": 1}],
                "upstream_batches": [{"creation_batch_id": "b1", "rows": [1]}],
            },
        ),
    ],
    ids=["unknown-field", "missing-field", "unknown-row-field"],
)
def test_a_payload_that_does_not_fit_its_event_is_an_unknown_event(
    type_name: str, payload: ev.Payload
) -> None:
    with pytest.raises(ev.UnknownEventError, match=f"{type_name} v1 does not fit this code"):
        ev.decode(type_name, 1, payload)


def test_event_newer_than_the_code_is_refused() -> None:
    with pytest.raises(ev.UnknownEventError, match="newer"):
        ev.decode("HospitalCreated", ev.HospitalCreated.schema_version + 1, {"row": 1})


def test_derived_event_id_is_a_deterministic_uuid() -> None:
    first = ev.derived_event_id("batch-1", "requested", 3, 1)

    assert first == ev.derived_event_id("batch-1", "requested", 3, 1)
    assert first != ev.derived_event_id("batch-1", "requested", 3, 2)
    assert uuid.UUID(first).version == 5


def test_new_event_ids_are_unique() -> None:
    assert len({ev.new_event_id() for _ in range(100)}) == 100


EVENTS_DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def _documented_events() -> dict[str, str]:
    """docs/events.md's event sections by heading (`### Name`), each up to the next heading."""
    sections = re.split(r"^(#{2,3} .+)$", EVENTS_DOC.read_text(encoding="utf-8"), flags=re.M)
    return {
        heading.removeprefix("### ").strip(): body
        for heading, body in zip(sections[1::2], sections[2::2], strict=True)
        if heading.startswith("### ")
    }


def _expected_fields(cls: type[ev.Event]) -> set[str]:
    """The event's fields, and for its rows and upstream batches theirs as `rows[].name`."""
    names = {f.name for f in dataclasses.fields(cls)}
    if cls is ev.BatchCreated:
        names |= {f"rows[].{f.name}" for f in dataclasses.fields(ev.Row)}
        names |= {f"upstream_batches[].{f.name}" for f in dataclasses.fields(ev.UpstreamBatch)}
    return names


def test_the_event_log_reference_has_a_section_for_each_event_type_and_no_other() -> None:
    assert set(_documented_events()) == set(ev.EVENT_TYPES)


@pytest.mark.parametrize("type_name", sorted(ev.EVENT_TYPES))
def test_the_event_log_reference_documents_every_field_of_an_event(type_name: str) -> None:
    cls = ev.EVENT_TYPES[type_name]
    section = _documented_events().get(type_name, "")
    documented = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))

    assert documented == _expected_fields(cls), f"docs/events.md, section {type_name}"
    assert f"Schema version {cls.schema_version}." in " ".join(section.split())
