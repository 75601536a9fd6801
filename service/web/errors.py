"""One error shape everywhere: {"detail": "..."} or {"detail": [{"loc", "msg", "type"}]}.

Also the answer to an `Expect` header (aiohttp's runs before any middleware), and the
server log's line for a request that aiohttp's HTTP parser refused (RefusedRequests).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractMatchInfo
from aiohttp.http_exceptions import HttpProcessingError
from marshmallow import ValidationError

from service.domain.csv_intake import CsvRejected, Problem, problem

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
# A client's X-Request-ID is kept only when it is safe to echo and to store in the audit log.
CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,128}")
# The client's own bytes that the HTTP parser quotes in its message, to the end of the line:
# a header too long came as "...when reading: b'Bearer <token>...'".
QUOTED_BYTES = re.compile(r"""(?:^|[:\s])\s*(?:bytearray\()?b?['"].*""")


class ApiError(Exception):
    """An error a client caused or can act on, with its status and detail."""

    def __init__(self, status: int, detail: str | list[Problem]) -> None:
        super().__init__(detail if isinstance(detail, str) else json.dumps(detail))
        self.status, self.detail = status, detail


def invalid(loc: list[str | int], msg: str, kind: str = "value_error") -> ApiError:
    """A 422 for one problem at one place of the request."""
    return ApiError(422, [problem(loc, msg, kind)])


def error_response(
    status: int, detail: str | list[Problem], headers: dict[str, str] | None = None
) -> web.Response:
    """The JSON error body every endpoint uses."""
    return web.json_response({"detail": detail}, status=status, headers=headers)


def webargs_error(
    error: ValidationError,
    req: web.Request,
    schema: Any,
    *,
    error_status_code: int | None,
    error_headers: Any,
) -> NoReturn:
    """Turn webargs' {location: {field: [messages]}} into FastAPI's list of problems."""
    problems: list[Problem] = []
    messages = error.messages if isinstance(error.messages, dict) else {"body": error.messages}
    for location, fields in messages.items():
        where = {"querystring": "query", "match_info": "path", "json": "body"}.get(
            location, location
        )
        items = fields.items() if isinstance(fields, dict) else [("", fields)]
        for field, texts in items:
            for text in _messages(texts):
                problems.append(problem([where, field], text, "value_error"))
    raise ApiError(422, problems)


def _messages(texts: Any) -> list[str]:
    """A field's messages; a list field's come per item ({index: [messages]})."""
    if isinstance(texts, dict):
        return [text for inner in texts.values() for text in _messages(inner)]
    return [str(text) for text in (texts if isinstance(texts, list) else [texts])]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give each request an id; answer every failure in the one JSON shape, never a traceback."""
    request[REQUEST_ID] = request_id = _request_id(request)
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.detail)
    except CsvRejected as exc:
        response = error_response(exc.status, exc.problems)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect: aiohttp answers it, with the request's id too
            exc.headers["X-Request-ID"] = request_id
            raise
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404 and exc.text and exc.text.startswith("404:"):
            detail = "Not Found"
        response = error_response(exc.status, detail, headers=_kept_headers(exc))
    except Exception:
        log.exception(
            "unexpected error in %s %s (request %s)", request.method, request.path, request_id
        )
        response = error_response(500, f"Internal server error (request id {request_id})")
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
    return response


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k in ("Allow", "Location")}


def answer_expect_in_api_shape(app: web.Application) -> None:
    """Have every route, those with no match (404, 405) included, answer an Expect header
    with `expect_handler`.

    aiohttp runs a route's Expect handler before any middleware. `add_route` takes one, but
    aiohttp-apispec's routes and the route made per request for a 404 or 405 do not, so it
    is set on whatever route each request resolves to.
    """
    resolve = app.router.resolve

    async def resolving(request: web.Request) -> AbstractMatchInfo:
        match = await resolve(request)
        match.route._expect_handler = expect_handler
        return match

    app.router.resolve = resolving  # type: ignore[method-assign,assignment]


async def expect_handler(request: web.Request) -> None:
    """aiohttp's default for `Expect`, answering an unknown one with this API's 417.

    It runs before any middleware, and aiohttp's own 417 quotes the header: a value that is
    not UTF-8 could not be encoded and became a plain-text 500.
    """
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp does: the body has not started
        return
    raise web.HTTPExpectationFailed(
        text=json.dumps({"detail": f"unknown Expect: {expect[:80]!r}; only 100-continue"}),
        content_type="application/json",
        headers={"X-Request-ID": _request_id(request)},  # the middleware has not run
    )


def _request_id(request: web.Request) -> str:
    """The client's X-Request-ID when it is safe to echo and to store, else a new one."""
    given = request.headers.get("X-Request-ID", "")
    return given if CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RefusedRequests(logging.Filter):
    """For aiohttp's server log: a request its HTTP parser refused (a header too long, a
    control character, a body that does not decode) is logged at ERROR with a traceback,
    though the client got its 4xx. It is the client's fault: one INFO line says it, without
    the bytes the parser quotes (a header's value may be a credential)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, web.RequestPayloadError):  # the body read again after the answer
            error = error.__cause__
        if isinstance(error, HttpProcessingError) and 400 <= error.code < 500:
            first = error.message.partition("\n")[0]  # then the bytes, quoted
            reason = QUOTED_BYTES.sub("", first).rstrip(":. ") or "malformed request"
            record.msg = f"{record.getMessage()}: HTTP {error.code}, {reason}"
            record.args = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True
