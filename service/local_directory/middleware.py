"""What sits around the endpoints: Starlette's routing answers, cold starts and faults."""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

from service.local_directory.faults import COMMIT_STATUS_FAULTS, STATUS_FAULTS
from service.local_directory.options import CONTROL_PREFIX, ENDPOINTS, rate_limit_of
from service.local_directory.responses import DirectoryError, DirectoryRestarted, json_answer
from service.local_directory.standin import STANDIN_KEY, StandIn
from service.local_directory.validation import ValidationFailed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HANG_POLL_SECONDS = 0.05


@web.middleware
async def directory_conditions(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Apply cold starts to every directory request, then count it and inject its fault."""
    standin = request.app[STANDIN_KEY]
    endpoint = request.match_info.route.name
    if request.path.startswith(CONTROL_PREFIX) and standin.options.control:
        return await handler(request)
    await standin.wait_until_awake()
    if endpoint not in ENDPOINTS:
        return await handler(request)
    fault = standin.receive(endpoint)
    if fault is None:
        return await handler(request)
    if fault in STATUS_FAULTS:
        return _fault_answer(int(fault), endpoint)
    if fault in COMMIT_STATUS_FAULTS:
        await handler(request)
        return _fault_answer(int(fault.removeprefix("commit_")), endpoint)
    if fault == "hang":
        await _hang(request, standin)
    elif fault == "commit_drop":
        await handler(request)
    return _drop_connection(request)


@web.middleware
async def fastapi_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer refusals, unknown paths and wrong methods with FastAPI's bodies."""
    routing_error = request.match_info.http_exception
    if routing_error is not None:
        return await _routing_answer(request, routing_error)
    try:
        return await handler(request)
    except ValidationFailed as exc:
        return json_answer({"detail": exc.errors}, status=422)
    except DirectoryError as exc:
        return json_answer(exc.body, status=exc.status)
    except DirectoryRestarted:
        return _drop_connection(request)


async def _routing_answer(request: web.Request, error: web.HTTPException) -> web.Response:
    if error.status == 405:
        return json_answer({"detail": "Method Not Allowed"}, 405, {"Allow": error.headers["Allow"]})
    # Starlette's redirect_slashes: an unmatched path whose twin with or without the trailing
    # slash matches a route (with any method) answers 307 to that twin.
    if (path := request.path) != "/":
        twin = (path.rstrip("/") or "/") if path.endswith("/") else f"{path}/"
        twin_match = await request.app.router.resolve(request.clone(rel_url=twin))
        if twin_match.http_exception is None or twin_match.http_exception.status == 405:
            location = request.url.with_path(twin).with_query(request.url.query)
            return web.Response(status=307, headers={"Location": str(location)})
    return json_answer({"detail": "Not Found"}, 404)


def _fault_answer(status: int, endpoint: str) -> web.Response:
    if status == 429:
        return json_answer(
            {"error": f"Rate limit exceeded: {rate_limit_of(endpoint)} per 1 minute"}, 429
        )
    # Failures of the host's proxy or an unhandled exception: plain text, not FastAPI JSON.
    return web.Response(status=status, text=HTTPStatus(status).phrase)


async def _hang(request: web.Request, standin: StandIn) -> None:
    # aiohttp does not cancel a handler whose client left, so watch the connection; a
    # restart ends the process that held the request.
    generation = standin.generation
    while not standin.closing and _connected(request) and standin.generation == generation:
        await standin.pause(_HANG_POLL_SECONDS)


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _drop_connection(request: web.Request) -> web.Response:
    """Reset the client's connection; the returned response is never written."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes the close an RST, so the client sees a reset, not a clean EOF.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp fails to write this to the closed transport and logs that only at debug level.
    return web.Response(status=204)
