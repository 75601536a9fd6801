"""Live progress over websockets: one batch's events in order, or every batch's progress.

Messages are JSON objects with a `type`; docs/websocket.md describes each kind and close code.
Nothing is queued per client: each socket reads the log from its own position, so a slow
client costs a read position, not memory, and is told to resync once it lags too far.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp_apispec import docs

from service.domain import batch as b
from service.projections import queries
from service.store.records import StoredEvent
from service.web import presenters, schemas
from service.web.batches import (
    BAD_ID_OR_QUERY,
    BAD_QUERY,
    BATCH_ID_PARAMETER,
    NOT_FOUND,
    existing_batch,
)
from service.web.errors import ApiError, invalid
from service.web.keys import ENCODED_EVENTS, SETTINGS, SOCKETS, STORE

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

FINISHED = WSCloseCode.OK  # the batch reached a finished state
SHUTDOWN = WSCloseCode.GOING_AWAY  # the service is stopping
RESYNC = 4000  # the client fell behind: reconnect with ?after=<last version received>
DASHBOARD_BATCHES = 50  # batches in the /ws snapshot

HANDSHAKE_RESPONSES = {
    101: {"description": "switching to websocket; docs/websocket.md lists the messages"},
    400: {"schema": schemas.Error, "description": "not a websocket handshake"},
    403: {"schema": schemas.Error, "description": "cross-origin handshake refused"},
}
AFTER_OUT_OF_RANGE = {422: {"schema": schemas.Error, "description": "?after out of range"}}


@dataclass(frozen=True)
class Closing:
    """How a sender wants its socket closed."""

    code: int
    reason: str


Sender = Callable[[web.WebSocketResponse], Coroutine[Any, Any, Closing]]


def check_origin(request: web.Request) -> None:
    """Refuse cross-origin handshakes unless the origin is configured as allowed.

    Clients that send no Origin (command-line tools, servers) are not browsers and pass.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return
    allowed = request.app[SETTINGS].websocket.allowed_origins
    same_host = urlsplit(origin).netloc.lower() == request.host.lower()
    if not (same_host or origin in allowed or "*" in allowed):
        raise ApiError(
            403,
            f"websocket origin {origin!r} is not allowed; add it to websocket.allowed_origins",
        )


def _after(request: web.Request, floor: int, ceiling: int) -> int | None:
    raw = request.query.get("after")
    if raw is None:
        return None
    try:
        value = int(raw)
        if not floor <= value <= ceiling:
            raise ValueError
    except ValueError:
        raise invalid(
            ["query", "after"],
            f"after must be an integer from {floor} to {ceiling}, got {raw[:40]!r}",
        ) from None
    return value


async def _send(
    ws: web.WebSocketResponse, message: dict[str, Any] | str, seconds: float | None
) -> bool:
    """Send one message (a dict, or one already encoded); False when the client has not
    taken it within `seconds`."""
    text = message if isinstance(message, str) else json.dumps(message)
    try:
        async with asyncio.timeout(seconds):
            await ws.send_str(text)
    except TimeoutError:
        return False
    return True


async def _read_until_closed(ws: web.WebSocketResponse) -> None:
    # Clients send nothing we act on; reading answers pings and notices their close.
    async for msg in ws:
        if msg.type is WSMsgType.ERROR:
            return


async def _close(ws: web.WebSocketResponse, closing: Closing, seconds: float | None) -> None:
    """Close with a code, giving up (and dropping the connection) after `seconds`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await ws.close(code=closing.code, message=closing.reason.encode()[:123])


async def _serve(request: web.Request, sender: Sender) -> web.WebSocketResponse:
    """Upgrade, run `sender` while reading the client's side until either ends, then close."""
    seconds = request.app[SETTINGS].websocket.heartbeat_seconds or None
    ws = web.WebSocketResponse(heartbeat=seconds)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "this route is a websocket: connect with a websocket client")
    await ws.prepare(request)
    sockets = request.app[SOCKETS]
    sockets.add(ws)
    reading = asyncio.create_task(_read_until_closed(ws))
    sending = asyncio.create_task(sender(ws))
    try:
        await asyncio.wait((reading, sending), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (reading, sending):
            task.cancel()
        await asyncio.gather(reading, sending, return_exceptions=True)
        sockets.discard(ws)
    if ws.closed or sending.cancelled():  # the client left, or the service closed it
        return ws
    if (error := sending.exception()) is not None:
        if isinstance(error, ConnectionError):  # aiohttp's reset errors are ConnectionErrors
            return ws
        log.error("websocket %s failed", request.path, exc_info=error)
        closing = Closing(WSCloseCode.INTERNAL_ERROR, "internal error; reconnect with ?after")
    else:
        closing = sending.result()
    await _close(ws, closing, seconds)
    return ws


def _not_reading(seconds: float | None) -> Closing:
    return Closing(RESYNC, f"not reading for {seconds}s; reconnect with ?after=<last version>")


def _progress(state: b.BatchState) -> dict[str, Any]:
    return presenters.progress(presenters.batch_record(state))


def _event_message(event: StoredEvent, state: b.BatchState) -> dict[str, Any]:
    """One event and the progress right after it."""
    return {
        "type": "event",
        "version": event.stream_version,
        "event": event.to_json(),
        "progress": _progress(state),
    }


def _whole(kind: str, state: b.BatchState) -> dict[str, Any]:
    """A snapshot or finished message: progress and status as of the state's version."""
    batch, rows = presenters.records_of(state)
    return {
        "type": kind,
        "version": state.version,
        "progress": presenters.progress(batch),
        "status": presenters.status(batch, rows),
    }


def _advance(state: b.BatchState | None, event: StoredEvent) -> b.BatchState:
    """The state with one more event folded in; the first event starts it."""
    if state is None:
        return b.fold([(event.decode(), event.recorded_at)])
    return b.apply(state, event.decode(), event.recorded_at)


def _settled(state: b.BatchState) -> bool:
    return state.finished and not state.unsettled()


@routes.get("/batch/{batch_id}/ws")
@docs(
    tags=["live"],
    summary="Websocket: a batch's snapshot, then each event with updated progress",
    description=(
        "Upgrade to a websocket (docs/websocket.md). Without ?after the first message is a "
        "`snapshot` (progress and status at a stream version); then one `event` message per "
        "later event of the batch, in version order, each with the updated progress. "
        "?after=N replays the events after version N instead, and no snapshot is sent. "
        "Once the batch is finished, a `finished` message and close code 1000. Close code "
        "4000: the client fell behind; reconnect with ?after=<last version received>. "
        "1001: the service is shutting down."
    ),
    parameters=[
        BATCH_ID_PARAMETER,
        {
            "in": "query",
            "name": "after",
            "type": "integer",
            "minimum": -1,
            "required": False,
            "description": "resume after this stream version (-1 replays from the start)",
        },
    ],
    responses={
        **NOT_FOUND,
        **BAD_ID_OR_QUERY,
        **HANDSHAKE_RESPONSES,
    },
)
async def batch_socket(request: web.Request) -> web.WebSocketResponse:
    check_origin(request)
    batch = await existing_batch(request)
    store, settings = request.app[STORE], request.app[SETTINGS].websocket
    encoded = request.app[ENCODED_EVENTS]
    stream = b.stream_id(batch["batch_id"])
    last = await store.stream_version(stream)
    after = _after(request, floor=-1, ceiling=last)
    # Events up to here are history the client asked for, not lag.
    live_from = store.head.position
    seconds = settings.heartbeat_seconds or None

    async def sender(ws: web.WebSocketResponse) -> Closing:
        state = None
        if after != -1:
            history = await store.read_stream(stream, limit=None if after is None else after + 1)
            state = b.fold((e.decode(), e.recorded_at) for e in history)
            if after is None and not await _send(ws, _whole("snapshot", state), seconds):
                return _not_reading(seconds)
        start = -1 if state is None else state.version
        # follow() is an async generator (annotated as an iterator): close it with us.
        following = store.follow(stream, start)
        async with contextlib.aclosing(following) as events:
            while state is None or not (state.version >= last and _settled(state)):
                event = await anext(events)
                state = _advance(state, event)
                message = encoded.get(
                    stream, event.stream_version, functools.partial(_event_message, event, state)
                )
                if not await _send(ws, message, seconds):
                    return _not_reading(seconds)
                lag = store.head.position - event.global_position
                if event.global_position > live_from and lag > settings.max_backlog:
                    reason = f"{lag} events behind; reconnect with ?after={state.version}"
                    return Closing(RESYNC, reason)
        if not await _send(ws, _whole("finished", state), seconds):
            return _not_reading(seconds)
        return Closing(FINISHED, f"batch {state.status}")

    return await _serve(request, sender)


@routes.get("/ws")
@docs(
    tags=["live"],
    summary="Websocket: progress of every batch as the log moves (for dashboards)",
    description=(
        f"Upgrade to a websocket (docs/websocket.md). First a `snapshot` of the "
        f"{DASHBOARD_BATCHES} newest batches and the log position it reflects, then, each time "
        "the log moves, a `progress` message with the current summary of every batch that "
        "changed. ?after=P starts from log position P instead of a snapshot. Never ends on "
        "its own; 1001 at shutdown, 4000 when the client stops reading."
    ),
    parameters=[
        {
            "in": "query",
            "name": "after",
            "type": "integer",
            "minimum": 0,
            "required": False,
            "description": "resume after this global log position",
        }
    ],
    responses={**BAD_QUERY, **HANDSHAKE_RESPONSES},
)
async def dashboard_socket(request: web.Request) -> web.WebSocketResponse:
    check_origin(request)
    store, settings = request.app[STORE], request.app[SETTINGS].websocket
    after = _after(request, floor=0, ceiling=store.head.position)
    seconds = settings.heartbeat_seconds or None

    async def sender(ws: web.WebSocketResponse) -> Closing:
        position = after
        if position is None:
            # Read before the listing: a change in between is sent twice, never missed.
            position = store.head.position
            recent = await queries.list_batches(
                store, status=None, limit=DASHBOARD_BATCHES, before=None
            )
            snapshot = {
                "type": "snapshot",
                "position": position,
                "batches": [presenters.summary(x) for x in recent[:DASHBOARD_BATCHES]],
            }
            if not await _send(ws, snapshot, seconds):
                return _not_reading(seconds)
        while True:
            # A client that reads slowly gets larger pages, so its lag never grows a queue.
            page = await store.read_all(position, limit=settings.max_backlog)
            if not page:
                await store.head.wait_past(position)
                continue
            changed = dict.fromkeys(e.stream_id.removeprefix("batch-") for e in page)
            batches = [await queries.get_batch(store, batch_id) for batch_id in changed]
            message = {
                "type": "progress",
                "position": page[-1].global_position,
                "batches": [presenters.summary(x) for x in batches if x is not None],
            }
            if not await _send(ws, message, seconds):
                return _not_reading(seconds)
            position = page[-1].global_position

    return await _serve(request, sender)


async def close_all(app: web.Application) -> None:
    """At shutdown, close every socket with 1001 Going Away, within the shutdown timeout."""
    tracked = app[SOCKETS]
    sockets = list(tracked)
    if not sockets:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(app[SETTINGS].app.shutdown_timeout):
            await asyncio.gather(
                *(ws.close(code=SHUTDOWN, message=b"server shutdown") for ws in sockets),
                return_exceptions=True,
            )
