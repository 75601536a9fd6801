"""Request validation that fails exactly as FastAPI and pydantic v2 fail (422 bodies)."""

from __future__ import annotations

import email.message
import json
import re
from typing import Any

from aiohttp import web

from service.local_directory.responses import DirectoryError
from service.local_directory.storage import NewHospital
from service.local_directory.uuid_parsing import parse_uuid

ErrorItem = dict[str, Any]
Changes = dict[str, str | None]

_NO_BODY = object()
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")  # ASCII digits: pydantic reads no others
MAX_INT_DIGITS = 4300  # Python's int() limit, which pydantic keeps: past it, int_parsing_size


class ValidationFailed(Exception):
    """A request FastAPI refuses with 422; `errors` is the `detail` list."""

    def __init__(self, errors: list[ErrorItem]) -> None:
        super().__init__(errors)
        self.errors = errors


def _error(
    kind: str, loc: list[str | int], msg: str, value: Any, ctx: dict[str, Any] | None = None
) -> ErrorItem:
    item: ErrorItem = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx is not None:
        item["ctx"] = ctx
    return item


async def read_body(request: web.Request) -> Any:
    """The request body as FastAPI hands it to validation; malformed JSON fails at once."""
    raw = await request.read()
    if not raw:
        return _NO_BODY
    if not _declares_json(request.headers.get("Content-Type")):
        # FastAPI validates a non-JSON body as the raw bytes, which no model accepts.
        return raw.decode(errors="replace")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValidationFailed(
            [_error("json_invalid", ["body", exc.pos], "JSON decode error", {}, {"error": exc.msg})]
        ) from exc
    except UnicodeDecodeError as exc:
        raise DirectoryError(400, {"detail": "There was an error parsing the body"}) from exc


def _declares_json(content_type: str | None) -> bool:
    # Starlette parses JSON when no type is sent or the type is application/json or */*+json.
    if content_type is None:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def new_hospital(body: Any, errors: list[ErrorItem]) -> NewHospital | None:
    """Validate a create body (HospitalCreate), recording failures in `errors`."""
    fields = _as_object(body, errors)
    if fields is None:
        return None
    name = _required_text(fields, "name", errors)
    address = _required_text(fields, "address", errors)
    phone = _optional_string(fields, "phone", errors)
    batch_id = _optional_uuid(fields, "creation_batch_id", errors)
    if errors or name is None or address is None:
        return None
    return NewHospital(name, address, phone, batch_id)


def hospital_changes(body: Any, errors: list[ErrorItem]) -> Changes | None:
    """Validate a PUT body: the fields it names, checked as on create, absent ones untouched."""
    fields = _as_object(body, errors)
    if fields is None:
        return None
    changes: Changes = {}
    for name in ("name", "address"):
        if name in fields:
            changes[name] = _required_text(fields, name, errors)
    if "phone" in fields:
        changes["phone"] = _optional_string(fields, "phone", errors)
    return None if errors else changes


def path_int(request: web.Request, name: str, errors: list[ErrorItem]) -> int | None:
    """An integer path parameter, or an `int_parsing` error."""
    raw = request.match_info[name]
    if _INTEGER.fullmatch(raw):
        if len(raw.strip().lstrip("+-")) <= MAX_INT_DIGITS:
            return int(raw)
        message = "Unable to parse input string as an integer, exceeded maximum size"
        errors.append(_error("int_parsing_size", ["path", name], message, raw))
        return None
    errors.append(
        _error(
            "int_parsing",
            ["path", name],
            "Input should be a valid integer, unable to parse string as an integer",
            raw,
        )
    )
    return None


def path_uuid(request: web.Request, name: str, errors: list[ErrorItem]) -> str | None:
    """A UUID path parameter in canonical lowercase form, or a `uuid_parsing` error."""
    return _uuid(request.match_info[name], ["path", name], errors)


def _as_object(body: Any, errors: list[ErrorItem]) -> dict[str, Any] | None:
    if body is _NO_BODY or body is None:  # FastAPI reads a JSON `null` body as no body
        errors.append(_error("missing", ["body"], "Field required", None))
        return None
    if not isinstance(body, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        errors.append(_error("model_attributes_type", ["body"], msg, body))
        return None
    return body


def _required_text(fields: dict[str, Any], name: str, errors: list[ErrorItem]) -> str | None:
    # pydantic checks in this order: present, a string, min_length=1, then the directory's
    # own not-blank validator. The value is stored untrimmed.
    loc: list[str | int] = ["body", name]
    if name not in fields:
        errors.append(_error("missing", loc, "Field required", fields))
        return None
    value = fields[name]
    if not isinstance(value, str):
        errors.append(_error("string_type", loc, "Input should be a valid string", value))
    elif not value:
        msg = "String should have at least 1 character"
        errors.append(_error("string_too_short", loc, msg, value, {"min_length": 1}))
    elif not value.strip():
        msg = "Value error, Field cannot be empty or whitespace only"
        errors.append(_error("value_error", loc, msg, value, {"error": {}}))
    else:
        return value
    return None


def _optional_string(fields: dict[str, Any], name: str, errors: list[ErrorItem]) -> str | None:
    value = fields.get(name)
    if value is None or isinstance(value, str):
        return value
    errors.append(_error("string_type", ["body", name], "Input should be a valid string", value))
    return None


def _optional_uuid(fields: dict[str, Any], name: str, errors: list[ErrorItem]) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    return _uuid(value, ["body", name], errors)


def _uuid(value: Any, loc: list[str | int], errors: list[ErrorItem]) -> str | None:
    if not isinstance(value, str):
        msg = "UUID input should be a string, bytes or UUID object"
        errors.append(_error("uuid_type", loc, msg, value))
        return None
    parsed = parse_uuid(value)
    if isinstance(parsed, str):
        msg = f"Input should be a valid UUID, {parsed}"
        errors.append(_error("uuid_parsing", loc, msg, value, {"error": parsed}))
        return None
    return str(parsed)
