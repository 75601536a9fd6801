"""Taking files in: upload-csv, validate-csv and bulk, with their Idempotency-Key."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any

from aiohttp import web
from aiohttp_apispec import docs, response_schema
from marshmallow import Schema

from service.domain import batch as b
from service.domain import csv_intake
from service.projections import queries
from service.store.records import ConcurrencyError, NewEvent
from service.web import schemas
from service.web.batches import actor, off_loop, status_response
from service.web.errors import ApiError, invalid
from service.web.keys import KEY_NAMESPACE, PROCESSOR, SETTINGS, STOPPING, STORE
from service.web.upload import Upload, upload_of

routes = web.RouteTableDef()

UPLOAD_MESSAGE = "CSV upload initiated. Use batch_id to track progress."
REPLAY_MESSAGE = (
    "This file was uploaded with this Idempotency-Key before: no new batch was created. "
    "Use batch_id to track progress."
)
FILE_PARAMETER = {
    "in": "formData",
    "name": "file",
    "type": "file",
    "required": True,
    "description": "CSV with header name,address,phone (phone optional), UTF-8",
}
MAX_KEY_LENGTH = 255
IDEMPOTENCY_PARAMETER = {
    "in": "header",
    "name": "Idempotency-Key",
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_KEY_LENGTH,
    "required": False,
    "description": "the same key with the same file returns the first batch instead of a new one",
}

# Where an accepted upload is followed: documented on every answer that sends it.
LOCATION = {"Location": {"type": "string", "description": "the batch's /status path"}}
REPLAYED = {
    "Idempotent-Replayed": {
        "type": "string",
        "description": "true when the same Idempotency-Key and file came before: no new batch",
    }
}


def intake_errors(schema: type[Schema]) -> dict[int, dict[str, Any]]:
    """What an upload can be refused with before its rows are looked at, and after."""
    return {
        400: {"schema": schema, "description": "the request body cannot be read"},
        408: {"schema": schema, "description": "the body took longer than csv.upload_seconds"},
        413: {"schema": schema, "description": "file larger than csv.max_bytes"},
        422: {"schema": schema, "description": "every problem of the file, with places"},
        503: {"schema": schema, "description": "the service began to stop before the body came"},
    }


async def accept_upload(request: web.Request) -> tuple[dict[str, Any], bool]:
    """Validate the upload and store its BatchCreated; (batch read model, newly created)."""
    settings = request.app[SETTINGS]
    key = _idempotency_key(request)  # before the body: a bad one is answered without reading it
    async with upload_of(request) as upload:
        parsed = await _checked(request, upload)
        sha = await asyncio.to_thread(_digest, upload.data)  # hashlib lets the loop run meanwhile
    store = request.app[STORE]
    if key is not None:
        # By the key, not the id: a batch from before the namespace was this database's has
        # an id derived in the one all deployments shared.
        batch_id = str(uuid.uuid5(request.app[KEY_NAMESPACE], key))
        if (known := await queries.get_batch_by_key(store, key)) is not None:
            return _same_upload(known, sha, parsed), False
    else:
        batch_id = str(uuid.uuid4())
    created = b.plan(
        batch_id, upload.filename or "", parsed.rows, settings.directory.batch_size, sha, key
    )
    try:
        stored = await store.append(
            b.stream_id(batch_id), -1, [NewEvent(created, metadata=actor(request))]
        )
    except ConcurrencyError:  # a concurrent upload with the same key won the race
        known = await queries.get_batch(store, batch_id)
        assert known is not None
        return _same_upload(known, sha, parsed), False
    await request.app[PROCESSOR].submit(stored[0])
    batch = await queries.get_batch(store, batch_id)
    assert batch is not None
    batch["warnings"] = parsed.warnings
    return batch, True


def _idempotency_key(request: web.Request) -> str | None:
    """The upload's Idempotency-Key header, if it has one that is fit to be a key."""
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        where: list[str | int] = ["header", "Idempotency-Key"]
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise invalid(where, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
        try:
            key.encode()  # aiohttp keeps header bytes that are not UTF-8 as surrogates
        except UnicodeEncodeError:
            raise invalid(where, "Idempotency-Key must be UTF-8 text") from None
    return key


async def _checked(request: web.Request, upload: Upload) -> csv_intake.ParsedCsv:
    """The file's rows, checked off the loop."""
    max_rows = request.app[SETTINGS].csv.max_rows
    return await off_loop(request, csv_intake.parse_upload, upload.filename, upload.data, max_rows)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _same_upload(known: dict[str, Any], sha: str, parsed: csv_intake.ParsedCsv) -> dict[str, Any]:
    """The batch a repeated upload names, with the warnings its (same) file gets."""
    if known["content_sha256"] != sha:
        raise ApiError(
            409,
            f"Idempotency-Key was already used for batch {known['batch_id']} with a different "
            "file; use a new key for a new file",
        )
    return {**known, "warnings": parsed.warnings}


def _replayed(created: bool) -> dict[str, str]:
    """The header that tells an answer to a repeated keyed upload from a new batch's: the
    bulk endpoint's /status body has no message to say so."""
    return {} if created else {"Idempotent-Replayed": "true"}


def _accepted_headers(batch_id: str, created: bool) -> dict[str, str]:
    """The headers of an accepted upload: the /status path it is followed at, and whether
    it is an earlier batch."""
    return {"Location": f"/batch/{batch_id}/status", **_replayed(created)}


def accepted_body(batch: dict[str, Any], created: bool) -> dict[str, Any]:
    """The upload answer users know, plus the validation warnings; a replay of a keyed
    upload (`created` false) says that it started nothing."""
    return {
        "batch_id": batch["batch_id"],
        "total_hospitals": batch["total_rows"],
        "message": UPLOAD_MESSAGE if created else REPLAY_MESSAGE,
        "status": batch["status"],
        "warnings": batch.get("warnings", []),
    }


@routes.post("/batch/upload-csv")
@docs(
    tags=["batches"],
    summary="Upload a CSV of hospitals; processing starts at once",
    consumes=["multipart/form-data"],
    parameters=[FILE_PARAMETER, IDEMPOTENCY_PARAMETER],
    responses={
        202: {
            "schema": schemas.UploadAccepted,
            "description": "accepted; follow it with batch_id",
            "headers": LOCATION,
        },
        200: {
            "schema": schemas.UploadAccepted,
            "description": "same Idempotency-Key and file",
            "headers": {**LOCATION, **REPLAYED},
        },
        409: {"schema": schemas.Error, "description": "Idempotency-Key reused for another file"},
        **intake_errors(schemas.Error),
    },
)
async def upload_csv(request: web.Request) -> web.Response:
    batch, created = await accept_upload(request)
    return web.json_response(
        accepted_body(batch, created),
        status=202 if created else 200,
        headers=_accepted_headers(batch["batch_id"], created),
    )


@routes.post("/batch/validate-csv")
@docs(
    tags=["batches"],
    summary="Check a CSV without creating anything",
    consumes=["multipart/form-data"],
    parameters=[FILE_PARAMETER],
    responses=intake_errors(schemas.ValidationResult),
)
@response_schema(schemas.ValidationResult, 200)
async def validate_csv(request: web.Request) -> web.Response:
    try:
        async with upload_of(request) as upload:
            parsed = await _checked(request, upload)
    except (csv_intake.CsvRejected, ApiError) as exc:
        # upload_of's refusals are all lists of problems, like the CSV's own.
        problems = exc.problems if isinstance(exc, csv_intake.CsvRejected) else exc.detail
        body = {"valid": False, "message": "CSV validation failed", "errors": problems}
        return web.json_response(body, status=exc.status)
    return web.json_response(
        {
            "valid": True,
            "message": "CSV file is valid and ready for processing",
            "total_rows": len(parsed.rows),
            "headers": list(parsed.headers),
            "warnings": parsed.warnings,
        }
    )


@routes.post("/hospitals/bulk")
@docs(
    tags=["batches"],
    summary="Upload a CSV and wait for the result (up to api.bulk_wait_seconds)",
    description=(
        "The same intake as /batch/upload-csv (Idempotency-Key included). Answers 200 with the "
        "/status body once the batch has finished, or 202 with its batch_id when it is still "
        "running after api.bulk_wait_seconds, or at once when the service begins to stop; "
        "processing goes on either way."
    ),
    consumes=["multipart/form-data"],
    parameters=[FILE_PARAMETER, IDEMPOTENCY_PARAMETER],
    responses={
        202: {
            "schema": schemas.UploadAccepted,
            "description": "still running: follow batch_id",
            "headers": {**LOCATION, **REPLAYED},
        },
        200: {
            "schema": schemas.Status,
            "description": "the batch finished: its /status body",
            "headers": REPLAYED,
        },
        409: {"schema": schemas.Error, "description": "Idempotency-Key reused for another file"},
        **intake_errors(schemas.Error),
    },
)
async def bulk(request: web.Request) -> web.Response:
    batch, created = await accept_upload(request)
    batch_id = batch["batch_id"]
    try:
        async with asyncio.timeout(request.app[SETTINGS].api.bulk_wait_seconds):
            finished = await _finished_before_stopping(request.app, batch_id)
    except TimeoutError:
        finished = False
    if not finished:
        now = await queries.get_batch(request.app[STORE], batch_id) or batch
        body = {**accepted_body(batch, created), "status": now["status"]}
        return web.json_response(body, status=202, headers=_accepted_headers(batch_id, created))
    response = await status_response(request, batch_id)
    response.headers.update(_replayed(created))
    return response


async def _finished_before_stopping(app: web.Application, batch_id: str) -> bool:
    """Wait until the batch finishes (True) or the service begins to stop (False).

    At shutdown aiohttp waits up to twice the shutdown timeout for handlers before the
    processor gets its own: a bulk request left waiting held a stop past docker compose's
    30 s, and then got no answer at all."""
    finished = asyncio.ensure_future(app[PROCESSOR].wait_finished(batch_id))
    stopping = asyncio.ensure_future(app[STOPPING].wait())
    try:
        await asyncio.wait((finished, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished.cancel()
        stopping.cancel()
    return finished.done() and not finished.cancelled()
