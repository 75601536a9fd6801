"""Marshmallow schemas: request parameters are validated with them, every body documented."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import EXCLUDE, Schema, fields, validate

from service.domain import batch as b

# Log positions and stream versions are SQLite integers (at most 2**63 - 1); /status?as_of=N
# reads N + 1 events, so a larger number in a query is refused instead of overflowing.
MAX_LOG_NUMBER = 2**63 - 2
# A whole number as a query writes it: int() also takes "1_0", " 3 " and other scripts' digits.
WHOLE_NUMBER = re.compile(r"-?[0-9]+")


class WholeNumber(fields.Integer):
    """An integer query parameter, in ASCII digits only."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str) and not WHOLE_NUMBER.fullmatch(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class Query(Schema):
    class Meta:
        unknown = EXCLUDE


class Problem(Schema):
    loc = fields.List(fields.Raw(), required=True, metadata={"example": ["row", 2, "name"]})
    msg = fields.String(required=True)
    type = fields.String(required=True, metadata={"example": "value_error"})


class Error(Schema):
    detail = fields.Raw(
        required=True,
        metadata={"description": "A message, or a list of problems with their places"},
    )


class UploadAccepted(Schema):
    batch_id = fields.UUID(required=True)
    total_hospitals = fields.Integer(required=True)
    message = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(b.BATCH_STATUSES))
    warnings = fields.List(fields.Nested(Problem), metadata={"description": "duplicate rows"})


class Progress(Schema):
    batch_id = fields.UUID(required=True)
    progress_percentage = fields.Float(required=True)
    processing_status = fields.String(required=True, validate=validate.OneOf(b.BATCH_STATUSES))
    processed_hospitals = fields.Integer(required=True)
    total_hospitals = fields.Integer(required=True)
    failed_hospitals = fields.Integer(required=True)
    current_message = fields.String(required=True)


class HospitalResult(Schema):
    row = fields.Integer(required=True)
    hospital_id = fields.Integer(allow_none=True, required=True)
    name = fields.String(required=True)
    address = fields.String(required=True)
    phone = fields.String(allow_none=True, required=True)
    status = fields.String(required=True, validate=validate.OneOf(b.ROW_STATUSES))
    error_message = fields.String(allow_none=True, required=True)


class Status(Schema):
    batch_id = fields.UUID(required=True)
    total_hospitals = fields.Integer(required=True)
    processed_hospitals = fields.Integer(required=True)
    failed_hospitals = fields.Integer(required=True)
    deleted_hospitals = fields.Integer(required=True)
    processing_time_seconds = fields.Float(required=True)
    batch_activated = fields.Boolean(required=True)
    processing_status = fields.String(required=True, validate=validate.OneOf(b.BATCH_STATUSES))
    activation_error = fields.String(allow_none=True, required=True)
    rollback_error = fields.String(
        allow_none=True,
        required=True,
        metadata={"description": "why the last rollback failed; roll back again to retry"},
    )
    rolled_back = fields.Boolean(required=True)
    version = fields.Integer(
        required=True, metadata={"description": "stream version this answer reflects"}
    )
    hospitals = fields.List(fields.Nested(HospitalResult), required=True)


class StatusQuery(Query):
    as_of = WholeNumber(
        validate=validate.Range(min=0, max=MAX_LOG_NUMBER),
        metadata={"description": "the batch as it was after this stream version"},
    )


class ValidationResult(Schema):
    valid = fields.Boolean(required=True)
    message = fields.String(required=True)
    total_rows = fields.Integer()
    headers = fields.List(fields.String())
    warnings = fields.List(fields.Nested(Problem))
    errors = fields.List(fields.Nested(Problem))


class Health(Schema):
    status = fields.String(required=True, metadata={"example": "healthy"})
    timestamp = fields.String(required=True)
    version = fields.String(required=True)
    uptime_seconds = fields.Float(required=True)
    database = fields.Dict(required=True)
    workers = fields.Dict(required=True)
    directory = fields.Dict(required=True)


class BatchSummary(Progress):
    file_name = fields.String(required=True)
    created_at = fields.String(required=True)
    finished_at = fields.String(allow_none=True, required=True)
    batch_activated = fields.Boolean(required=True)
    deleted_hospitals = fields.Integer(required=True)


class BatchList(Schema):
    batches = fields.List(fields.Nested(BatchSummary), required=True)
    next_cursor = fields.String(allow_none=True, required=True)


class ListQuery(Query):
    status = fields.List(
        fields.String(validate=validate.OneOf(b.BATCH_STATUSES)),
        metadata={"description": "only batches of this status; repeat it for several"},
    )
    limit = WholeNumber(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String(metadata={"description": "next_cursor of the previous page"})


class ResultsQuery(Query):
    only_rows = fields.String(data_key="only", validate=validate.OneOf(["failed"]))


class EventRecord(Schema):
    global_position = fields.Integer(required=True)
    event_id = fields.String(required=True)
    stream_id = fields.String(required=True)
    stream_version = fields.Integer(required=True)
    event_type = fields.String(required=True)
    schema_version = fields.Integer(required=True)
    recorded_at = fields.String(required=True)
    data = fields.Dict(required=True)
    metadata = fields.Dict(required=True)


class EventPage(Schema):
    events = fields.List(fields.Nested(EventRecord), required=True)
    next_after = fields.Integer(
        required=True,
        metadata={
            "description": "pass as ?after= for the next page; on an empty page (the end for "
            "now) the after asked for, to ask again for events appended since"
        },
    )


class EventsQuery(Query):
    # No load_default=None: it is documented as `default: null`, no integer, and a validator
    # of the document (openapi-spec-validator) refuses the whole of it.
    after = WholeNumber(validate=validate.Range(min=-1, max=MAX_LOG_NUMBER))
    limit = WholeNumber(load_default=100, validate=validate.Range(min=1, max=1000))
