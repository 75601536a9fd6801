"""What goes into the log and what comes back out of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from service.domain.events import Event, decode, new_event_id


class ConcurrencyError(Exception):
    """The stream moved on since the caller read it: nothing was written."""

    def __init__(self, stream_id: str, expected: int | None, actual: int) -> None:
        super().__init__(f"stream {stream_id} is at version {actual}, expected {expected}")
        self.stream_id, self.expected, self.actual = stream_id, expected, actual


class DuplicateEventError(Exception):
    """Some, not all, of an append's event ids are already stored: a caller bug."""


@dataclass(frozen=True)
class NewEvent:
    """An event about to be appended, with its id and metadata (request id, actor, cause)."""

    event: Event
    event_id: str = field(default_factory=new_event_id)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredEvent:
    """One row of the log, its payload already upcast to the current schema version."""

    global_position: int
    event_id: str
    stream_id: str
    stream_version: int
    event_type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: str
    # The event itself, already decoded by the writer or by from_row: saves a second decode.
    event: Event | None = field(default=None, compare=False, repr=False)

    def decode(self) -> Event:
        """The typed event."""
        if self.event is not None:
            return self.event
        return decode(self.event_type, self.schema_version, self.data)

    def to_json(self) -> dict[str, Any]:
        """The shape the audit API and `events` command print."""
        return {
            "global_position": self.global_position,
            "event_id": self.event_id,
            "stream_id": self.stream_id,
            "stream_version": self.stream_version,
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "recorded_at": self.recorded_at,
            "data": self.data,
            "metadata": self.metadata,
        }


EVENT_COLUMNS = (
    "global_position, event_id, stream_id, stream_version, event_type, "
    "schema_version, data, metadata, recorded_at"
)


def from_row(row: tuple[Any, ...]) -> StoredEvent:
    """Build a StoredEvent from a row selected with EVENT_COLUMNS, upcasting its payload."""
    position, event_id, stream, version, event_type, schema_version, data, meta, at = row
    event = decode(event_type, schema_version, orjson.loads(data))
    return StoredEvent(
        global_position=position,
        event_id=event_id,
        stream_id=stream,
        stream_version=version,
        event_type=event_type,
        schema_version=event.schema_version,
        data=_plain(event.payload()),
        metadata=orjson.loads(meta),
        recorded_at=at,
        event=event,
    )


def _plain(value: Any) -> Any:
    """The payload as JSON decodes it (tuples as lists), so a read equals what was appended."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
