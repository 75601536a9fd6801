"""Live progress over websockets: one batch's events in order, or every batch's progress.

Messages are JSON objects with a `type`; docs/websocket.md describes each kind and close code.
Nothing is queued per client: each socket sends its batch's shared messages (one Feed per
followed batch) from its own position, so a slow client costs a position, not memory, and
is told to resync once it lags too far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp_apispec import docs

from service.domain import batch as b
from service.projections import queries
from service.web import presenters, schemas
from service.web.batches import (
    BAD_ID_OR_QUERY,
    BAD_QUERY,
    BATCH,
    BATCH_ID_PARAMETER,
    NOT_FOUND,
    existing_batch,
)
from service.web.errors import REQUEST_ID, ApiError, invalid
from service.web.keys import FEEDS, SETTINGS, SOCKETS, STOPPING, STORE
from service.web.origins import origin_allowed

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

CLOSE_FINISHED = WSCloseCode.OK  # the batch reached a finished state
CLOSE_SHUTDOWN = WSCloseCode.GOING_AWAY  # the service is stopping
CLOSE_RESYNC = 4000  # the client fell behind: reconnect with ?after=<last version received>
DASHBOARD_BATCHES = 50  # batches in the /ws snapshot
# A dashboard that has caught up gathers the log's moves this long before its next message:
# a message per commit made every dashboard read the log and its batches hundreds of times
# a second, and held the other reads back.
DASHBOARD_PAUSE = 0.25

HANDSHAKE_RESPONSES = {
    101: {"description": "switching to websocket; docs/websocket.md lists the messages"},
    400: {"schema": schemas.Error, "description": "not a websocket handshake"},
    403: {
        "schema": schemas.Error,
        "description": "cross-origin handshake refused, or a browser sent it to a host name "
        "the service does not know (app.allowed_hosts)",
    },
}


@dataclass(frozen=True)
class Closing:
    """How a sender wants its socket closed."""

    code: int
    reason: str


GOING_AWAY = Closing(CLOSE_SHUTDOWN, "server shutdown")


Sender = Callable[[web.WebSocketResponse], Coroutine[Any, Any, Closing]]


def check_origin(request: web.Request) -> None:
    """Refuse cross-origin handshakes unless the origin is configured as allowed.

    Clients that send no Origin (command-line tools, servers) are not browsers and pass.
    """
    if not origin_allowed(request):
        origin = request.headers["Origin"]
        raise ApiError(
            403,
            f"websocket origin {origin!r} is not allowed; add it to websocket.allowed_origins",
        )


def _after(request: web.Request, floor: int, ceiling: int) -> int | None:
    raw = request.query.get("after")
    if raw is None:
        return None
    try:
        if not schemas.WHOLE_NUMBER.fullmatch(raw):
            raise ValueError
        value = int(raw)
        if not floor <= value <= ceiling:
            raise ValueError
    except ValueError:
        raise invalid(
            ["query", "after"],
            f"after must be an integer from {floor} to {ceiling}, got {raw[:40]!r}",
        ) from None
    return value


async def _send(ws: web.WebSocketResponse, message: dict[str, Any] | bytes, seconds: float) -> bool:
    """Send one message (a dict, or one already encoded); False when the client has not
    taken it within `seconds`."""
    text = message if isinstance(message, bytes) else orjson.dumps(message)
    try:
        async with asyncio.timeout(seconds):
            await ws.send_frame(text, WSMsgType.TEXT)
    except TimeoutError:
        return False
    return True


async def _write(
    request: web.Request,
    ws: web.WebSocketResponse,
    frames: bytes | bytearray,
    seconds: float,
) -> bool:
    """Write frames built by the feed in one go; False when the client has not taken them
    within `seconds`.

    aiohttp writes each message with a system call of its own; a few hundred followers of a
    busy batch spend most of the service's time there, so a socket writes what it has at once.
    """
    transport = request.transport
    if ws.closed or transport is None or transport.is_closing():
        raise ConnectionResetError("the websocket is closing")
    transport.write(frames)
    if transport.get_write_buffer_size():  # the kernel did not take it all: the client lags
        try:
            async with asyncio.timeout(seconds):
                await request.writer.drain()
        except TimeoutError:
            return False
    return True


async def _read_until_closed(ws: web.WebSocketResponse) -> None:
    # Clients send nothing we act on; reading answers pings and notices their close.
    async for msg in ws:
        if msg.type is WSMsgType.ERROR:
            return


async def _close(
    ws: web.WebSocketResponse,
    closing: Closing,
    seconds: float | None,
    transport: asyncio.Transport | None = None,
) -> None:
    """Close with a code; after `seconds` without the client's answer, reset `transport`.

    A client that has not answered has not read what was sent before the close either. A
    plain close leaves the kernel holding that for it (a finished 5,000-row batch's snapshot
    and final message: 1.8 MB) until it reads or goes away: 500 such sockets held 1.2 GB of
    the host's memory for minutes. A reset drops it at once.
    """
    try:
        async with asyncio.timeout(seconds):
            await ws.close(code=closing.code, message=closing.reason.encode()[:123])
    except TimeoutError:
        if transport is not None and (sock := transport.get_extra_info("socket")) is not None:
            # A peer that closed just as the wait ran out took the socket with it: uvloop's
            # then has no descriptor (ValueError), a plain one a bad one (OSError).
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()


async def _serve(request: web.Request, sender: Sender) -> web.WebSocketResponse:
    """Upgrade, run `sender` while reading the client's side until either ends, then close."""
    seconds = request.app[SETTINGS].websocket.heartbeat_seconds
    # The close handshake waits as long for the client as a message does: a client still
    # reading its backlog would otherwise see 1006 after aiohttp's 10 s, not 1000.
    ws = web.WebSocketResponse(heartbeat=seconds, timeout=seconds)
    try:
        ready = ws.can_prepare(request).ok
    except ValueError:  # aiohttp's own 400 quotes the header, and cannot when it is not UTF-8;
        ready = False  # a Sec-WebSocket-Key that is not ASCII fails base64 with a ValueError
    if not ready:
        raise ApiError(400, "this route is a websocket: connect with a websocket client")
    # The 101 is sent here, before the error middleware could add the id to the answer.
    ws.headers["X-Request-ID"] = request[REQUEST_ID]
    await ws.prepare(request)
    if request.app[STOPPING].is_set():  # upgraded after close_all took its list
        await _close(ws, GOING_AWAY, seconds, request.transport)
        return ws
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
    await _close(ws, closing, seconds, request.transport)
    return ws


def _not_reading(seconds: float) -> Closing:
    return Closing(
        CLOSE_RESYNC, f"not reading for {seconds}s; reconnect with ?after=<last version>"
    )


@routes.get(f"{BATCH}/ws")
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
    feeds = request.app[FEEDS]
    stream = b.stream_id(batch["batch_id"])
    last = await store.stream_version(stream)
    after = _after(request, floor=-1, ceiling=last)
    # Events up to here are history the client asked for, not lag.
    live_from = store.head.position
    seconds = settings.heartbeat_seconds

    async def sender(ws: web.WebSocketResponse) -> Closing:
        async with feeds.follow(store, stream) as feed:
            if after is None:
                await feed.wait_past(last - 1)
                version = feed.version
                if not await _send(ws, feed.snapshot(), seconds):
                    return _not_reading(seconds)
            else:
                version = after
                await feed.wait_past(version - 1)
            live_at: int | None = None  # the version of the first event after live_from
            while (finished := feed.finished_message(version) if version >= last else None) is None:
                await feed.wait_past(version)
                # Everything this socket is behind on goes in one write, shared with the
                # sockets at the same version.
                frames, upto = feed.burst(version)
                if live_at is None:
                    live_at = feed.first_past(live_from)
                # The burst's first live event lags the most: too far behind, resync there.
                resync = None
                if live_at is not None and (lagging := max(version + 1, live_at)) <= upto:
                    lag = store.head.position - feed.messages[lagging].position
                    if lag > settings.max_backlog:
                        frames = b"".join(m.frame for m in feed.messages[version + 1 : lagging + 1])
                        upto = lagging
                        reason = f"{lag} events behind; reconnect with ?after={lagging}"
                        resync = Closing(CLOSE_RESYNC, reason)
                if not await _write(request, ws, frames, seconds):
                    return _not_reading(seconds)
                if resync:
                    return resync
                version = upto
        if not await _send(ws, finished, seconds):
            return _not_reading(seconds)
        return Closing(CLOSE_FINISHED, f"batch {feed.messages[version].status}")

    return await _serve(request, sender)


@routes.get("/ws")
@docs(
    tags=["live"],
    summary="Websocket: progress of every batch as the log moves (for dashboards)",
    description=(
        f"Upgrade to a websocket (docs/websocket.md). First a `snapshot` of the "
        f"{DASHBOARD_BATCHES} newest batches and the log position it reflects, then, as the "
        f"log moves (at most {1 / DASHBOARD_PAUSE:g} times a second), a `progress` message "
        "with the current summary of every batch that changed. ?after=P starts from log "
        "position P instead of a snapshot. Never ends on its own; 1001 at shutdown, 4000 when "
        "the client stops reading."
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
    # Not the head: a position just sent may be read from the log before the head moves.
    last = await store.last_position() if "after" in request.query else 0
    after = _after(request, floor=0, ceiling=last)
    seconds = settings.heartbeat_seconds

    async def sender(ws: web.WebSocketResponse) -> Closing:
        position = after
        if position is None:
            # Read before the listing: a change in between is sent twice, never missed.
            position = store.head.position
            recent = await queries.list_batches(store, (), DASHBOARD_BATCHES, before=None)
            snapshot = {
                "type": "snapshot",
                "position": position,
                "batches": [presenters.summary(x) for x in recent[:DASHBOARD_BATCHES]],
            }
            if not await _send(ws, snapshot, seconds):
                return _not_reading(seconds)
        while True:
            # A client that reads slowly gets larger pages, so its lag never grows a queue.
            changed, upto, read = await queries.batches_moved(store, position, settings.max_backlog)
            if not read:
                await store.head.wait_past(position)
                continue
            batches = await queries.get_batches(store, changed)
            message = {
                "type": "progress",
                "position": upto,
                "batches": [presenters.summary(x) for x in batches],
            }
            if not await _send(ws, message, seconds):
                return _not_reading(seconds)
            position = upto
            if read < settings.max_backlog:  # caught up: let the next changes gather
                await asyncio.sleep(DASHBOARD_PAUSE)

    return await _serve(request, sender)


async def close_all(app: web.Application) -> None:
    """At shutdown, close every socket with 1001 Going Away, within the shutdown timeout."""
    app[STOPPING].set()  # sockets upgraded from now on close at once
    tracked = app[SOCKETS]  # not inlined: inside list() mypy infers the wrong AppKey type
    sockets = list(tracked)
    if not sockets:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(app[SETTINGS].app.shutdown_timeout):
            await asyncio.gather(
                *(_close(ws, GOING_AWAY, None) for ws in sockets),
                return_exceptions=True,
            )
