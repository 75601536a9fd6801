"""Answers written the way FastAPI writes them: compact JSON, `detail` errors."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class DirectoryError(Exception):
    """A refusal the directory answers with a JSON body, e.g. 404 `{"detail": ...}`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


class DirectoryRestarted(Exception):
    """The request was queued in a directory that restarted since: it dies unanswered."""


def json_answer(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response serialised like Starlette's JSONResponse."""
    payload = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return web.Response(
        status=status, body=payload.encode(), content_type="application/json", headers=headers
    )


def not_found(detail: str) -> DirectoryError:
    """The directory's 404 with its `detail` text."""
    return DirectoryError(404, {"detail": detail})
