"""The audit log API: a batch's events by stream version, the whole log by position."""

from __future__ import annotations

from aiohttp import web
from aiohttp_apispec import docs, querystring_schema, response_schema

from service.domain import batch as b
from service.web import schemas
from service.web.batches import (
    BAD_ID_OR_QUERY,
    BAD_QUERY,
    BATCH,
    BATCH_ID_PARAMETER,
    NOT_FOUND,
    existing_batch,
)
from service.web.keys import STORE

routes = web.RouteTableDef()


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
    after = -1 if query["after"] is None else query["after"]
    events = await request.app[STORE].read_stream(
        b.stream_id(batch["batch_id"]), after_version=after, limit=query["limit"]
    )
    next_after = events[-1].stream_version if events else None
    return web.json_response({"events": [e.to_json() for e in events], "next_after": next_after})


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
    after = max(0, query["after"] or 0)
    events = await request.app[STORE].read_all(after_position=after, limit=query["limit"])
    next_after = events[-1].global_position if events else None
    return web.json_response({"events": [e.to_json() for e in events], "next_after": next_after})
