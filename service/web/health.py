"""GET /health: can the service accept work, and what it knows of the directory."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.web import BaseRequest, StreamResponse
from aiohttp.web_log import AccessLogger
from aiohttp_apispec import docs, response_schema

from service import __version__
from service.web import schemas
from service.web.keys import CLIENT, PROCESSOR, SETTINGS, STARTED_AT, STORE

routes = web.RouteTableDef()


class QuietProbes(AccessLogger):
    """The access log, less the healthy answers of /health: an orchestrator's probe every
    few seconds buries the requests an operator looks for (an unhealthy answer is kept)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if request.path != "/health" or response.status != 200:
            super().log(request, response, time)


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()


@routes.get("/health")
@docs(
    tags=["service"],
    summary="Service health: 200 when it can accept work, 503 otherwise",
    responses={503: {"schema": schemas.Health, "description": "cannot accept work"}},
)
@response_schema(schemas.Health, 200)
async def health(request: web.Request) -> web.Response:
    app = request.app
    store, processor, client = app[STORE], app[PROCESSOR], app[CLIENT]
    try:
        # Ahead of user reads: a queue of large ones kept /health past a probe's timeout.
        ((count,),) = await store.select("SELECT COUNT(*) FROM batches", (), first=True)
        database = {"status": "ok", "path": store.path, "batches": count}
        database_ok = store.can_commit
        if store.commit_error is not None:  # a full disk, an I/O error, a lock held too long
            database["status"] = f"cannot commit: {store.commit_error}"
        elif not database_ok:
            database["status"] = "writer stopped"
    except sqlite3.Error as exc:
        database, database_ok = {"status": f"error: {exc}", "path": store.path}, False
    database["log_position"] = store.head.position
    wanted = app[SETTINGS].directory.concurrency
    workers = {
        "alive": processor.workers_alive,
        "configured": wanted,
        "active_batches": processor.active_batches,
    }
    reach = client.reachability
    directory = {
        "url": client.base_url,
        "reachable": reach.reachable,
        "last_call_at": _iso(reach.last_call_at),
        "last_success_at": _iso(reach.last_success_at),
        "last_error": reach.last_error,
        "creates_per_minute": app[SETTINGS].directory.creates_per_minute,  # 0: not paced
    }
    healthy = database_ok and processor.workers_alive == wanted
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "timestamp": datetime.now(UTC).isoformat(),
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - app[STARTED_AT], 3),
        "database": database,
        "workers": workers,
        "directory": directory,
    }
    return web.json_response(body, status=200 if healthy else 503)
