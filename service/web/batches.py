"""Batch endpoints past intake (progress, status, listing, results, resume, rollback): thin
handlers that parse, call one service function, and shape the answer; and what the other
web modules share with them: the batch path and its id, the 404, the documented 422s, the
event metadata of a user's decision, the cached /status answer, and `off_loop`."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp_apispec import docs, querystring_schema, response_schema

from service.domain import batch as b
from service.domain import csv_intake
from service.processing.processor import Refused
from service.projections import queries
from service.store.records import from_row
from service.web import presenters, schemas
from service.web.errors import REQUEST_ID, ApiError, invalid
from service.web.keys import CPU_WORK, PROCESSOR, STATUS_CACHE, STORE

routes = web.RouteTableDef()
T = TypeVar("T")

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
ATTACHMENT = {
    "Content-Disposition": {
        "type": "string",
        "description": 'attachment; filename="<batch_id>-results.csv" (-failed.csv with '
        "only_rows=failed)",
    }
}


# Every batch path takes any segment, so batch_id_of answers 422 for a malformed id (aiohttp's
# default pattern leaves out braces, and `x{` would be a route 404). /batch/upload-csv and
# /batch/validate-csv are fixed paths: without the lookahead aiohttp routes DELETE to them too
# (a rollback of batch "upload-csv") and lists DELETE in their 405's Allow.
BATCH = "/batch/{batch_id:(?!upload-csv$|validate-csv$)[^/]+}"


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


async def off_loop(request: web.Request, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a thread, one such job at a time: parsing 10 MiB or folding a large
    batch takes from tens of milliseconds to seconds, and the loop waits its turn for the
    interpreter behind each thread doing so."""
    async with request.app[CPU_WORK]:
        return await asyncio.to_thread(work, *args)


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
    return web.Response(body=body, content_type="application/json", charset="utf-8")


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
    store = request.app[STORE]
    stream = b.stream_id(batch_id)
    if (last := await store.stream_version(stream)) < 0:
        raise batch_not_found(batch_id)
    if last < as_of:  # answered before the stream is read: it may hold 100,000 events
        raise invalid(
            ["query", "as_of"], f"batch {batch_id} has no version {as_of}; its last is {last}"
        )
    # Decoding a large batch's events takes as long as folding them (0.7 s for 50,000 rows),
    # so it is done off the loop too; and the lock bounds the undecoded rows held at once.
    async with request.app[CPU_WORK]:
        rows = await store.stream_rows(stream, limit=as_of + 1)
        body = await asyncio.to_thread(_status_as_of, rows)
    return web.Response(body=body, content_type="application/json", charset="utf-8")


def _status_as_of(selected: list[tuple[Any, ...]]) -> bytes:
    """The /status body of the batch as its events, selected as EVENT_COLUMNS, left it."""
    history = [from_row(r) for r in selected]
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
    responses={
        **NOT_FOUND,
        **BAD_ID_OR_QUERY,
        200: {"description": "CSV file (errors are JSON)", "headers": ATTACHMENT},
    },
)
@querystring_schema(schemas.ResultsQuery)
async def results_csv(request: web.Request) -> web.Response:
    batch = await existing_batch(request)
    values = await queries.get_row_values(request.app[STORE], batch["batch_id"])
    only_failed = request["querystring"].get("only_rows") == "failed"
    text = await off_loop(request, _results_text, values, only_failed)  # 0.3 s at 50,000 rows
    suffix = "failed" if only_failed else "results"
    return web.Response(
        text=text,
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{batch["batch_id"]}-{suffix}.csv"'},
    )


def _results_text(values: list[tuple[Any, ...]], only_failed: bool) -> str:
    rows = queries.row_dicts(values)
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
    return out.getvalue()


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
        409: {
            "schema": schemas.Error,
            "description": "still processing, rolled back, or nothing to resume",
        },
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
