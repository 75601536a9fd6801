"""Live progress over websockets: one batch's events in order, or every batch's progress.

Messages are JSON objects with a `type`; docs/websocket.md describes each kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp_apispec import docs

from service.domain import batch as b
from service.projections import queries
from service.web import presenters
from service.web.batches import BAD_ID, NOT_FOUND, existing_batch
from service.web.errors import ApiError
from service.web.keys import SETTINGS, SOCKETS, STORE

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

RESYNC = 4000  # closed for lagging too far behind: reconnect with ?after=<last version>
Sender = Callable[[web.WebSocketResponse], Coroutine[Any, Any, None]]


def check_origin(request: web.Request) -> None:
    """Refuse cross-origin handshakes unless the origin is configured as allowed."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    allowed = request.app[SETTINGS].websocket.allowed_origins
    if urlsplit(origin).netloc != request.host and origin not in allowed:
        raise ApiError(403, f"websocket origin {origin!r} is not allowed")


def _after(request: web.Request, floor: int) -> int | None:
    raw = request.query.get("after")
    if raw is None:
        return None
    try:
        value = int(raw)
        if value < floor:
            raise ValueError
    except ValueError:
        raise ApiError(
            422,
            [
                {
                    "loc": ["query", "after"],
                    "msg": f"after must be an integer >= {floor}",
                    "type": "int_parsing",
                }
            ],
        ) from None
    return value


async def _serve(request: web.Request, sender: Sender) -> web.WebSocketResponse:
    """Run `sender` on an open socket while reading the client's side until either ends."""
    settings = request.app[SETTINGS].websocket
    ws = web.WebSocketResponse(heartbeat=settings.heartbeat_seconds)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    sending = asyncio.create_task(sender(ws))
    try:
        async for msg in ws:
            if msg.type is WSMsgType.ERROR:
                break
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        request.app[SOCKETS].discard(ws)
    return ws


async def _send(ws: web.WebSocketResponse, message: dict[str, Any], seconds: float) -> None:
    # A client that does not read within the heartbeat interval is not keeping up.
    async with asyncio.timeout(seconds):
        await ws.send_json(message)


@routes.get("/batch/{batch_id}/ws")
@docs(
    tags=["live"],
    summary="Websocket: a batch's snapshot, then each event with updated progress",
    description=(
        "Upgrade to a websocket. Without ?after the first message is a `snapshot`; with "
        "?after=N the events after version N are replayed first and no snapshot is sent. "
        "A `finished` message and a normal close end a finished batch. Close code 4000 "
        "means the client fell behind: reconnect with ?after=<last version received>."
    ),
    responses={
        **NOT_FOUND,
        **BAD_ID,
        101: {"description": "switching to websocket"},
        403: {"description": "cross-origin handshake refused"},
    },
)
async def batch_socket(request: web.Request) -> web.WebSocketResponse:
    check_origin(request)
    batch = await existing_batch(request)
    after = _after(request, floor=-1)
    store, settings = request.app[STORE], request.app[SETTINGS].websocket
    stream = b.stream_id(batch["batch_id"])

    async def sender(ws: web.WebSocketResponse) -> None:
        history = await store.read_stream(stream, limit=None if after is None else after + 1)
        state = b.fold((e.decode(), e.recorded_at) for e in history)
        if after is None:
            batch_record, rows = presenters.records_of(state)
            snapshot = {
                "type": "snapshot",
                "version": state.version,
                "progress": presenters.progress(batch_record),
                "status": presenters.status(batch_record, rows),
            }
            await _send(ws, snapshot, settings.heartbeat_seconds)
        async for event in _until_finished(
            store.follow(stream, after_version=state.version), state
        ):
            b.apply(state, event.decode(), event.recorded_at)
            progress = presenters.progress(presenters.records_of(state)[0])
            message = {
                "type": "event",
                "version": event.stream_version,
                "event": event.to_json(),
                "progress": progress,
            }
            await _send(ws, message, settings.heartbeat_seconds)
            if store.head.position - event.global_position > settings.max_backlog:
                await ws.close(
                    code=RESYNC, message=f"behind; reconnect with ?after={state.version}".encode()
                )
                return
        final = {
            "type": "finished",
            "version": state.version,
            "processing_status": state.status,
            "progress": presenters.progress(presenters.records_of(state)[0]),
        }
        await _send(ws, final, settings.heartbeat_seconds)
        await ws.close()

    return await _serve(request, sender)


async def _until_finished(events: AsyncIterator[Any], state: b.BatchState) -> AsyncIterator[Any]:
    """The followed events, ending once the batch has nothing left to do."""
    if state.finished and not state.unsettled():
        return
    async for event in events:
        yield event
        if state.finished and not state.unsettled():
            return


@routes.get("/ws")
@docs(
    tags=["live"],
    summary="Websocket: progress of every batch as the log moves (for dashboards)",
    description=(
        "First a `snapshot` of the 50 newest batches with the log position, then a "
        "`progress` message listing the batches that changed, each time the log moves. "
        "?after=P starts from log position P instead of the snapshot."
    ),
    responses={
        101: {"description": "switching to websocket"},
        403: {"description": "cross-origin handshake refused"},
    },
)
async def dashboard_socket(request: web.Request) -> web.WebSocketResponse:
    check_origin(request)
    after = _after(request, floor=0)
    store, settings = request.app[STORE], request.app[SETTINGS].websocket

    async def sender(ws: web.WebSocketResponse) -> None:
        position = after
        if position is None:
            position = store.head.position
            recent = await queries.list_batches(store, status=None, limit=50, before=None)
            snapshot = {
                "type": "snapshot",
                "position": position,
                "batches": [presenters.progress(x) for x in recent[:50]],
            }
            await _send(ws, snapshot, settings.heartbeat_seconds)
        while True:
            page = await store.read_all(position, limit=settings.max_backlog)
            if not page:
                await store.head.wait_past(position)
                continue
            position = page[-1].global_position
            changed = dict.fromkeys(e.stream_id.removeprefix("batch-") for e in page)
            batches = [await queries.get_batch(store, batch_id) for batch_id in changed]
            message = {
                "type": "progress",
                "position": position,
                "batches": [presenters.progress(x) for x in batches if x is not None],
            }
            await _send(ws, message, settings.heartbeat_seconds)

    return await _serve(request, sender)


async def close_all(app: web.Application) -> None:
    """At shutdown, close every socket with 1001 Going Away."""
    sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
