"""The audit log API: a batch's events by stream version, the whole log by position."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp_apispec import docs, querystring_schema, response_schema

from service.domain import batch as b
from service.store.records import from_row
from service.web import schemas
from service.web.batches import (
    BAD_ID_OR_QUERY,
    BAD_QUERY,
    BATCH,
    BATCH_ID_PARAMETER,
    NOT_FOUND,
    existing_batch,
    off_loop,
)
from service.web.keys import STORE

routes = web.RouteTableDef()
# Characters of event data and metadata a page holds at most (and always its first event),
# whatever its limit: a page of the largest uploads' BatchCreated events would take GBs.
PAGE_CHARS = 8 * 2**20


@routes.get(f"{BATCH}/events")
@docs(
    tags=["audit"],
    summary="A batch's events in order; ?after=<stream version> pages on",
    parameters=[BATCH_ID_PARAMETER],
    responses={**NOT_FOUND, **BAD_ID_OR_QUERY},
)
@querystring_schema(schemas.EventsQuery)
@response_schema(schemas.EventPage, 200)
async def batch_events(request: web.Request) -> web.Response:
    batch = await existing_batch(request)
    query = request["querystring"]
    after = query.get("after", -1)
    rows = await request.app[STORE].stream_rows(
        b.stream_id(batch["batch_id"]), after, query["limit"], PAGE_CHARS
    )
    return await _page(request, rows, "stream_version", after)


@routes.get("/events")
@docs(
    tags=["audit"],
    summary="Every event of every batch; ?after=<global position> pages on",
    responses=BAD_QUERY,
)
@querystring_schema(schemas.EventsQuery)
@response_schema(schemas.EventPage, 200)
async def all_events(request: web.Request) -> web.Response:
    query = request["querystring"]
    after = max(0, query.get("after", 0))
    rows = await request.app[STORE].log_rows(after, query["limit"], PAGE_CHARS)
    return await _page(request, rows, "global_position", after)


async def _page(
    request: web.Request, rows: list[tuple[Any, ...]], key: str, after: int
) -> web.Response:
    """A page of events, decoded and encoded off the loop: a page holding large batches'
    BatchCreated events took seconds (1.7 s for six of 50,000 rows), /health waiting."""
    body = await off_loop(request, _page_body, rows, key, after)
    return web.Response(body=body, content_type="application/json", charset="utf-8")


def _page_body(rows: list[tuple[Any, ...]], key: str, after: int) -> bytes:
    # orjson: json.dumps holds the interpreter lock for the whole of a 30 MB page (0.6 s).
    events = [from_row(r).to_json() for r in rows]
    next_after = events[-1][key] if events else after  # at the end: ask there again later
    return orjson.dumps({"events": events, "next_after": next_after})
