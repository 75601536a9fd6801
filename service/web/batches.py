"""Batch endpoints: thin handlers that parse, call one service function, and shape the answer."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp_apispec import docs, querystring_schema, response_schema
from marshmallow import Schema

from service.domain import batch as b
from service.domain import csv_intake
from service.processing.processor import Refused
from service.projections import queries
from service.store.records import ConcurrencyError, NewEvent, StoredEvent
from service.web import presenters, schemas
from service.web.errors import REQUEST_ID, ApiError, invalid
from service.web.keys import (
    CPU_WORK,
    KEY_NAMESPACE,
    PROCESSOR,
    SETTINGS,
    STATUS_CACHE,
    STOPPING,
    STORE,
)
from service.web.upload import Upload, upload_of

routes = web.RouteTableDef()
T = TypeVar("T")

UPLOAD_MESSAGE = "CSV upload initiated. Use batch_id to track progress."
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
BATCH_ID_PARAMETER = {
    "in": "path",
    "name": "batch_id",
    "type": "string",
    "format": "uuid",
    "required": True,
    "description": "batch_id of the upload answer",
}
NOT_FOUND = {404: {"schema": schemas.Error, "description": "unknown batch"}}
BAD_ID = {422: {"schema": schemas.Error, "description": "malformed batch id"}}
BAD_QUERY = {422: {"schema": schemas.Error, "description": "bad query parameter"}}
BAD_ID_OR_QUERY = {
    422: {"schema": schemas.Error, "description": "malformed batch id or bad query parameter"}
}


def intake_errors(schema: type[Schema]) -> dict[int, dict[str, Any]]:
    """What an upload can be refused with before its rows are looked at, and after."""
    return {
        400: {"schema": schema, "description": "the request body cannot be read"},
        408: {"schema": schema, "description": "the body took longer than csv.upload_seconds"},
        413: {"schema": schema, "description": "file larger than csv.max_bytes"},
        422: {"schema": schema, "description": "every problem of the file, with places"},
    }


# Every batch path takes any segment, so batch_id_of answers 422 for a malformed id (aiohttp's
# default pattern leaves out braces, and `x{` would be a route 404). /batch/upload-csv and
# /batch/validate-csv are fixed paths: without the lookahead aiohttp routes DELETE to them too
# (a rollback of batch "upload-csv") and lists DELETE in their 405's Allow.
BATCH = "/batch/{batch_id:(?!upload-csv$|validate-csv$)[^/]+}"

# Where an accepted upload is followed: documented on every answer that sends it.
LOCATION = {"Location": {"type": "string", "description": "the batch's /status path"}}


def actor(request: web.Request) -> dict[str, Any]:
    """Event metadata for a decision a user made through the API."""
    return {"actor": "api", "request_id": request[REQUEST_ID], "remote": request.remote}


def batch_id_of(request: web.Request) -> str:
    """The path's batch id, normalised; 422 when it is not a UUID."""
    raw = request.match_info["batch_id"]
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise invalid(
            ["path", "batch_id"], f"batch_id must be a UUID, got {raw[:80]!r}", "uuid_parsing"
        ) from None


def batch_not_found(batch_id: str) -> ApiError:
    """The 404 users of the original tool know."""
    return ApiError(404, f"Batch with ID {batch_id} not found")


async def existing_batch(request: web.Request) -> dict[str, Any]:
    """The read model of the path's batch, or 404."""
    batch_id = batch_id_of(request)
    batch = await queries.get_batch(request.app[STORE], batch_id)
    if batch is None:
        raise batch_not_found(batch_id)
    return batch


# Intake ------------------------------------------------------------------------------------


async def accept_upload(request: web.Request) -> tuple[dict[str, Any], bool]:
    """Validate the upload and store its BatchCreated; (batch read model, newly created)."""
    settings = request.app[SETTINGS]
    async with upload_of(request) as upload:
        parsed = await _checked(request, upload)
        sha = await asyncio.to_thread(_digest, upload.data)  # hashlib lets the loop run meanwhile
    key = request.headers.get("Idempotency-Key")
    store = request.app[STORE]
    if key is not None:
        where: list[str | int] = ["header", "Idempotency-Key"]
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise invalid(where, f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
        try:
            key.encode()  # aiohttp keeps header bytes that are not UTF-8 as surrogates
        except UnicodeEncodeError:
            raise invalid(where, "Idempotency-Key must be UTF-8 text") from None
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
    request.app[PROCESSOR].submit(stored[0])
    batch = await queries.get_batch(store, batch_id)
    assert batch is not None
    batch["warnings"] = parsed.warnings
    return batch, True


async def off_loop(request: web.Request, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a thread, one such job at a time: parsing 10 MiB or folding a large
    batch takes from tens of milliseconds to seconds, and the loop waits its turn for the
    interpreter behind each thread doing so."""
    async with request.app[CPU_WORK]:
        return await asyncio.to_thread(work, *args)


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


def _status_location(batch_id: str) -> dict[str, str]:
    """The Location header of an accepted upload: the /status path it is followed at."""
    return {"Location": f"/batch/{batch_id}/status"}


def accepted_body(batch: dict[str, Any]) -> dict[str, Any]:
    """The upload answer users know, plus the validation warnings."""
    return {
        "batch_id": batch["batch_id"],
        "total_hospitals": batch["total_rows"],
        "message": UPLOAD_MESSAGE,
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
            "headers": LOCATION,
        },
        409: {"schema": schemas.Error, "description": "Idempotency-Key reused for another file"},
        **intake_errors(schemas.Error),
    },
)
async def upload_csv(request: web.Request) -> web.Response:
    batch, created = await accept_upload(request)
    return web.json_response(
        accepted_body(batch),
        status=202 if created else 200,
        headers=_status_location(batch["batch_id"]),
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
            "headers": LOCATION,
        },
        409: {"schema": schemas.Error, "description": "Idempotency-Key reused for another file"},
        **intake_errors(schemas.Error),
    },
)
@response_schema(schemas.Status, 200, description="the batch finished: its /status body")
async def bulk(request: web.Request) -> web.Response:
    batch, _ = await accept_upload(request)
    batch_id = batch["batch_id"]
    try:
        async with asyncio.timeout(request.app[SETTINGS].api.bulk_wait_seconds):
            finished = await _finished_before_stopping(request.app, batch_id)
    except TimeoutError:
        finished = False
    if not finished:
        now = await queries.get_batch(request.app[STORE], batch_id) or batch
        body = {**accepted_body(batch), "status": now["status"]}
        return web.json_response(body, status=202, headers=_status_location(batch_id))
    return await status_response(request, batch_id)


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


# Reading ------------------------------------------------------------------------------------


def live_batch(request: web.Request, batch_id: str) -> dict[str, Any] | None:
    """A batch being worked on, from its fold in memory: pollers need not wait for a read
    (under scenario 4's load, 10 ms of /status at the median and 25-45 ms at the p99)."""
    live = request.app[PROCESSOR].live_state(batch_id)
    return presenters.batch_record(live) if live else None


async def status_response(request: web.Request, batch_id: str) -> web.Response:
    """The /status body, shared with other pollers of the batch (see StatusCache)."""
    batch = live_batch(request, batch_id)
    body = await request.app[STATUS_CACHE].body(request.app[STORE], batch_id, batch)
    if body is None:
        raise batch_not_found(batch_id)
    return web.Response(body=body, content_type="application/json")


@routes.get(f"{BATCH}/progress")
@docs(
    tags=["batches"],
    summary="How far a batch is",
    parameters=[BATCH_ID_PARAMETER],
    responses={**NOT_FOUND, **BAD_ID},
)
@response_schema(schemas.Progress, 200)
async def progress(request: web.Request) -> web.Response:
    batch_id = batch_id_of(request)
    batch = live_batch(request, batch_id) or await existing_batch(request)
    held = request.app[PROCESSOR].held_by_window(batch_id)
    return web.json_response(presenters.progress(batch, held))


@routes.get(f"{BATCH}/status")
@docs(
    tags=["batches"],
    summary="A batch's result, row by row; ?as_of=N shows it as it was after version N",
    parameters=[BATCH_ID_PARAMETER],
    responses={**NOT_FOUND, **BAD_ID_OR_QUERY},
)
@querystring_schema(schemas.StatusQuery)
@response_schema(schemas.Status, 200)
async def status(request: web.Request) -> web.Response:
    batch_id = batch_id_of(request)
    as_of = request["querystring"].get("as_of")
    if as_of is None:
        return await status_response(request, batch_id)
    history = await request.app[STORE].read_stream(b.stream_id(batch_id), limit=as_of + 1)
    if not history:
        raise batch_not_found(batch_id)
    if (last := history[-1].stream_version) < as_of:
        raise invalid(
            ["query", "as_of"], f"batch {batch_id} has no version {as_of}; its last is {last}"
        )
    body = await off_loop(request, _status_as_of, history)
    return web.Response(body=body, content_type="application/json")


def _status_as_of(history: list[StoredEvent]) -> bytes:
    """The /status body of the batch as the events of `history` left it."""
    batch, rows = presenters.records_of(b.fold((e.decode(), e.recorded_at) for e in history))
    return orjson.dumps(presenters.status(batch, rows, until=history[-1].recorded_at))


@routes.get("/batch")
@docs(
    tags=["batches"],
    summary="Batches, newest first, paged by cursor",
    description=(
        "Each entry carries the /progress numbers. Pass next_cursor as ?cursor= for the next "
        "page; it is null on the last page."
    ),
    responses={422: {"schema": schemas.Error, "description": "bad status, limit or cursor"}},
)
@querystring_schema(schemas.ListQuery)
@response_schema(schemas.BatchList, 200)
async def list_batches(request: web.Request) -> web.Response:
    query = request["querystring"]
    before = _decode_cursor(query.get("cursor"))
    page = await queries.list_batches(
        request.app[STORE], query.get("status", []), query["limit"], before
    )
    more = len(page) > query["limit"]
    page = page[: query["limit"]]
    cursor = _encode_cursor(page[-1]) if more else None
    return web.json_response(
        {"batches": [presenters.summary(x) for x in page], "next_cursor": cursor}
    )


def _encode_cursor(batch: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(f"{batch['created_at']}|{batch['batch_id']}".encode()).decode()


def _decode_cursor(cursor: str | None) -> tuple[str, str] | None:
    if cursor is None:
        return None
    try:
        created_at, _, batch_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        uuid.UUID(batch_id)
    except (ValueError, UnicodeDecodeError):
        raise invalid(["query", "cursor"], "not a cursor from this API") from None
    return created_at, batch_id


# Results export -------------------------------------------------------------------------------

RESULT_COLUMNS = ("row", "name", "address", "phone", "status", "hospital_id", "error_message")


@routes.get(f"{BATCH}/results.csv")
@docs(
    tags=["batches"],
    summary="Every row's result as CSV; ?only=failed gives the failed rows in upload format",
    description=(
        "Columns row,name,address,phone,status,hospital_id,error_message; with ?only=failed, "
        "name,address,phone. A value starting with = + - @, a tab or a carriage return is "
        "prefixed with ' so that a spreadsheet shows it instead of computing it; uploads take "
        "that ' off again, so the failed rows can be fixed and uploaded as they are."
    ),
    produces=["text/csv", "application/json"],
    parameters=[BATCH_ID_PARAMETER],
    responses={**NOT_FOUND, **BAD_ID_OR_QUERY, 200: {"description": "CSV file (errors are JSON)"}},
)
@querystring_schema(schemas.ResultsQuery)
async def results_csv(request: web.Request) -> web.Response:
    batch = await existing_batch(request)
    rows = await queries.get_rows(request.app[STORE], batch["batch_id"])
    only_failed = request["querystring"].get("only_rows") == "failed"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if only_failed:
        writer.writerow(csv_intake.COLUMNS)
        for r in rows:
            if r["status"] == b.ROW_FAILED:
                writer.writerow([csv_intake.escaped(r[c]) for c in csv_intake.COLUMNS])
    else:
        writer.writerow(RESULT_COLUMNS)
        for r in rows:
            result = presenters.row_result(r)
            writer.writerow([csv_intake.escaped(result[c]) for c in RESULT_COLUMNS])
    suffix = "failed" if only_failed else "results"
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{batch["batch_id"]}-{suffix}.csv"'},
    )


# Lifecycle ------------------------------------------------------------------------------------


@routes.post(f"{BATCH}/resume")
@docs(
    tags=["lifecycle"],
    summary="Retry the failed rows (each is looked for in the directory first)",
    description=(
        "Each failed row is first looked for in the directory (a create that failed unclearly "
        "may have been stored) and created only when absent; the batch is activated once "
        "every row exists. After an activation failure, resume checks and retries activation. "
        "409 while the batch is processing, after a rollback, or when nothing failed."
    ),
    parameters=[BATCH_ID_PARAMETER],
    responses={
        **NOT_FOUND,
        **BAD_ID,
        409: {"schema": schemas.Error, "description": "still processing, or nothing to resume"},
    },
)
@response_schema(schemas.Progress, 202)
async def resume(request: web.Request) -> web.Response:
    batch = await existing_batch(request)
    try:
        resumed = await request.app[PROCESSOR].resume(batch["batch_id"], actor(request))
    except Refused as exc:
        raise ApiError(409, str(exc)) from exc
    # The batch as the resume left it: a read after it could already show the work's end.
    return web.json_response(presenters.progress(presenters.batch_record(resumed)), status=202)


@routes.delete(BATCH)
@docs(
    tags=["lifecycle"],
    summary="Roll a batch back: delete its hospitals from the directory",
    description=(
        "Stops new creates, lets those in flight finish, then deletes every upstream batch. "
        "Answers 202 while that runs and 200 once the batch is rolled back; repeating is harmless. "
        "Afterwards the batch reads processing_status failed with rolled_back true; created rows "
        "read deleted, rows never created read failed. If the directory keeps refusing a delete, "
        "the rollback stops with rollback_error set: rows never sent read failed, and a batch "
        "not yet activated reads failed, and still does while asking again tries again."
    ),
    parameters=[BATCH_ID_PARAMETER],
    responses={
        **NOT_FOUND,
        **BAD_ID,
        202: {"schema": schemas.Progress, "description": "rolling back"},
    },
)
@response_schema(schemas.Progress, 200, description="rolled back")
async def rollback(request: web.Request) -> web.Response:
    batch = await existing_batch(request)
    if not batch["rolled_back"]:
        await request.app[PROCESSOR].rollback(batch["batch_id"], actor(request))
        batch = await existing_batch(request)
    return web.json_response(
        presenters.progress(batch), status=200 if batch["rolled_back"] else 202
    )
