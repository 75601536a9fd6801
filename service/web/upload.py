"""Reading the uploaded file out of a multipart body, within the size limit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from service.domain.csv_intake import Problem, problem
from service.web.errors import ApiError, invalid
from service.web.keys import INTAKE, SETTINGS, STOPPING

CHUNK = 64 * 1024
FORM_OVERHEAD = 64 * 1024  # boundaries and part headers around the file itself
MAX_EXTRA = 10  # fields other than the file listed at most: the answer stops there


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413,
        [
            problem(
                ["file"],
                f"the upload is larger than {max_bytes} bytes (csv.max_bytes); split the file",
                "file_too_large",
            )
        ],
    )


@contextlib.asynccontextmanager
async def upload_of(request: web.Request) -> AsyncIterator[Upload]:
    """The uploaded file, read in its turn: at most csv.concurrent_uploads are read and
    checked at once, each holding its place until the block ends. What the headers alone
    refuse is answered before the upload waits."""
    settings = request.app[SETTINGS].csv
    if (size := request.content_length) is not None and size > settings.max_bytes + FORM_OVERHEAD:
        raise _too_large(settings.max_bytes)
    if request.content_type != "multipart/form-data":
        raise invalid(
            ["body", "file"],
            "send the CSV as multipart/form-data in a field named 'file' "
            f"(got Content-Type {request.content_type or 'none'})",
            "missing",
        )
    async with request.app[INTAKE]:  # bodies in memory at once, each up to csv.max_bytes
        watch = asyncio.ensure_future(_end_body_at_stop(request))
        try:
            upload = await _read_upload(request, settings.max_bytes, settings.upload_seconds)
        finally:
            watch.cancel()
        yield upload


class _Stopping(Exception):
    """The service began to stop before the body had all arrived."""


async def _end_body_at_stop(request: web.Request) -> None:
    """End the body's reading once a stop begins before all of it came: from then on aiohttp
    reads nothing more from the connection, so the rest would never come, and the upload
    would hold the stop for the whole shutdown timeout and get no answer."""
    await request.app[STOPPING].wait()
    if not request.content.is_eof():
        request.content.set_exception(_Stopping())


async def _read_upload(request: web.Request, max_bytes: int, seconds: float) -> Upload:
    """The `file` field of a multipart/form-data body, which must arrive within `seconds`;
    anything else is a 4xx naming it."""
    upload: Upload | None = None
    extra: list[Problem] = []
    left = max_bytes + FORM_OVERHEAD  # what every part together may still take
    try:
        # aiohttp sets no time limit on a body: one sent slowly, or not ended, would hold
        # what it has sent so far, up to csv.max_bytes, for as long as its connection lasts.
        async with asyncio.timeout(seconds):
            reader = await request.multipart()
            while len(extra) < MAX_EXTRA and (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise ValueError("nested multipart bodies are not accepted")
                # Every part counts against the one allowance; the file also against its own.
                is_file = part.name == "file" and upload is None
                limit = min(left, max_bytes) if is_file else left
                data = await _read_limited(part, limit, max_bytes)
                left -= len(data)
                if is_file:
                    upload = Upload(_storable(part.filename), data)
                else:
                    name = part.name or "(unnamed)"
                    what = (
                        "a second 'file'" if part.name == "file" else f"unexpected field {name!r}"
                    )
                    why = f"{what}: send exactly one field, 'file'"
                    extra.append(problem(["body", name], why, "extra_forbidden"))
    except _Stopping as exc:
        why = "the service is stopping: send the file again once it is back"
        raise ApiError(503, [problem(["body"], why, "service_stopping")]) from _unframed(exc)
    except TimeoutError as exc:
        why = f"the body did not arrive within {seconds:g} s (csv.upload_seconds); send it again"
        raise ApiError(408, [problem(["body"], why, "body_timeout")]) from exc
    except (ValueError, AssertionError, RuntimeError, BadHttpMessage) as exc:
        # A BadHttpMessage (a part's headers too long, or not headers): str() adds its status.
        said = exc.message if isinstance(exc, BadHttpMessage) else exc
        raise invalid(
            ["body"], f"malformed multipart body: {said}", "multipart_error"
        ) from _unframed(exc)
    except ConnectionResetError as exc:  # the client left before the body ended: no one reads
        raise ApiError(  # this answer, but the access log shows a 400, not a 500 and a traceback
            400, [problem(["body"], "the request body ended early: connection lost", "body_error")]
        ) from _unframed(exc)
    except web.RequestPayloadError as exc:  # the body itself is broken, e.g. gzip that is not
        cause = exc.__cause__.message if isinstance(exc.__cause__, BadHttpMessage) else exc
        raise ApiError(
            400, [problem(["body"], f"the request body cannot be read: {cause}", "body_error")]
        ) from _unframed(exc)
    if upload is None and len(extra) < MAX_EXTRA:  # else it may be in the part not read
        extra.insert(0, problem(["body", "file"], "Field required: the CSV file", "missing"))
    if extra:
        raise ApiError(422, extra)
    assert upload is not None
    return upload


def _unframed(exc: BaseException) -> BaseException:
    """`exc` without its traceback. aiohttp keeps an error of the body (the connection lost,
    a broken chunk) on the request and raises that one object to every read: its traceback
    held these frames, with the request and what they had read (up to csv.max_bytes), in a
    reference cycle only a full collection frees, and app.py makes those rare."""
    return exc.with_traceback(None)


def _storable(filename: str | None) -> str | None:
    # aiohttp keeps header bytes that are not UTF-8 as lone surrogates, which SQLite refuses.
    return None if filename is None else filename.encode("utf-8", "replace").decode("utf-8")


async def _read_limited(part: BodyPartReader, limit: int, max_bytes: int) -> bytes:
    """The part's bytes; 413 (naming `max_bytes`) once they pass `limit`."""
    chunks, size = [], 0
    while chunk := await part.read_chunk(CHUNK):
        size += len(chunk)
        if size > limit:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)
