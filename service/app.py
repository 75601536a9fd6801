"""create_app(settings): wiring only; resources start and stop in cleanup contexts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp_apispec import setup_aiohttp_apispec, validation_middleware

from service import __version__
from service.logs import repeats_held_back
from service.processing.directory_client import DirectoryClient
from service.processing.processor import Processor
from service.projections import batches, queries
from service.settings import Settings
from service.store.event_store import EventStore
from service.store.lock import exclusive
from service.web import batches as batch_routes
from service.web import docs, events, health, intake, presenters, websocket
from service.web.errors import answer_expect_in_api_shape, error_middleware, webargs_error
from service.web.feeds import Feeds
from service.web.keys import (
    CLIENT,
    CPU_WORK,
    FEEDS,
    INTAKE,
    KEY_NAMESPACE,
    PROCESSOR,
    SETTINGS,
    SOCKETS,
    STARTED_AT,
    STATUS_CACHE,
    STOPPING,
    STORE,
)
from service.web.origins import SAFE_METHODS, known_hosts, same_origin_writes
from service.web.status_cache import StatusCache

REQUEST_ID_HEADER = {
    "X-Request-ID": {
        "type": "string",
        "description": "the request's X-Request-ID if it was safe to echo, else a new id; "
        "the service's log names the request by it",
    }
}
YOUNG_COLLECTION_THRESHOLD = 20_000  # allocations between young collections (700 by default)

DESCRIPTION = (
    "Bulk-load hospitals from a CSV into the Hospital Directory API. Every fact is an event "
    "in an append-only log; progress, status and the audit trail are read from it. "
    "Live progress: websocket GET /batch/{batch_id}/ws and GET /ws (see the README)."
)


async def resources(app: web.Application) -> AsyncIterator[None]:
    """The store, the directory's session and the processor: started in that order, stopped
    in reverse. One that fails to start stops those already started: aiohttp unwinds its
    cleanup contexts only once all of them have started, and a store left open kept its
    reader threads, so a service that failed to start never exited."""
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(repeats_held_back())
        await stack.enter_async_context(_store(app))
        await stack.enter_async_context(_directory(app))
        await stack.enter_async_context(_processor(app))
        yield


@contextlib.asynccontextmanager
async def _store(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = EventStore(
        settings.database.path,
        projectors=[batches.project],
        busy_timeout_ms=settings.database.busy_timeout_ms,
    )
    with exclusive(settings.database.path):
        await store.open()
        app[STORE] = store
        app[KEY_NAMESPACE] = await queries.idempotency_namespace(store)
        try:
            yield
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def _directory(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS].directory
    async with DirectoryClient.new_session(settings) as session:
        app[CLIENT] = DirectoryClient(session, settings)
        yield


@contextlib.asynccontextmanager
async def _processor(app: web.Application) -> AsyncIterator[None]:
    store, cache = app[STORE], app[STATUS_CACHE]
    # A new status needs a new /status body: build it now rather than on a poller's time.
    processor = Processor(
        store,
        app[CLIENT],
        app[SETTINGS].directory,
        lambda state: cache.warm(store, state.batch_id, presenters.batch_record(state)),
    )
    app[PROCESSOR] = processor
    try:
        await processor.start()
        yield
    finally:
        await processor.stop(grace=app[SETTINGS].app.shutdown_timeout)
        await cache.close()


async def _halt_processor(app: web.Application) -> None:
    """No new call to the directory once a stop begins, though requests under way still
    get up to the shutdown timeout before the processor's own stop."""
    if (processor := app.get(PROCESSOR)) is not None:
        processor.halt(app[SETTINGS].app.shutdown_timeout)


async def _no_sniffing(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer is what its Content-Type says: a hospital name that reads as HTML in a
    results file, or in a JSON body, is never taken for a page by a browser."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


async def _tune_collector(app: web.Application) -> None:
    """Leave what start-up built (modules, routes, schemas, recovered batches) out of every
    later garbage collection: with it, each full collection during a 5,000-row batch
    stopped the loop for 23-33 ms; without it, for about 6 ms.

    Then collect the young generation less often. A row's tasks, futures and answers die
    by reference count within milliseconds; collecting every 700 allocations kept
    scanning them while alive and cost the loop a tenth of its time.
    """
    gc.collect()  # what start-up left in cycles goes first, instead of being kept for good
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


def create_app(settings: Settings) -> web.Application:
    """The service as an aiohttp application."""
    # As FastAPI's redirect_slashes: `/batch/upload-csv/` answers 307 to the path without it.
    trailing_slash = web.normalize_path_middleware(
        append_slash=False,
        remove_slash=True,
        merge_slashes=False,
        redirect_class=web.HTTPTemporaryRedirect,
    )
    app = web.Application(
        middlewares=[
            error_middleware,
            known_hosts,
            same_origin_writes,
            trailing_slash,
            validation_middleware,
        ]
    )
    app[SETTINGS] = settings
    app[STARTED_AT] = time.monotonic()
    app[SOCKETS] = weakref.WeakSet()
    app[STOPPING] = asyncio.Event()
    app[STATUS_CACHE] = StatusCache(settings.api.status_cache_seconds)
    app[FEEDS] = Feeds()
    app[CPU_WORK] = asyncio.Lock()
    app[INTAKE] = asyncio.Semaphore(settings.csv.concurrent_uploads)
    app.cleanup_ctx.append(resources)
    app.on_startup.append(_tune_collector)
    app.on_response_prepare.append(_no_sniffing)
    app.on_shutdown.append(_halt_processor)  # before aiohttp waits for requests under way
    app.on_shutdown.append(websocket.close_all)
    app.add_routes(intake.routes)
    app.add_routes(batch_routes.routes)
    app.add_routes(events.routes)
    app.add_routes(health.routes)
    app.add_routes(websocket.routes)
    docs.add_routes(app)
    setup_aiohttp_apispec(
        app,
        title="Hospital Batch Processor",
        version=__version__,
        info={"description": DESCRIPTION},
        url="/openapi.json",  # no swagger_path: its page calls an online validator (web.docs)
        error_callback=webargs_error,
        in_place=True,
    )
    answer_expect_in_api_shape(app)
    # aiohttp answers HEAD wherever it answers GET; listing each twice only clutters /docs.
    for operations in app["swagger_dict"]["paths"].values():
        operations.pop("head", None)
    _document_what_every_route_answers(app["swagger_dict"])
    return app


def _document_what_every_route_answers(spec: dict[str, Any]) -> None:
    """What any operation can answer besides its own: the origin middlewares' 403, to a
    browser that sent the request to a name the service does not know or a change from
    another site's page, `expect_handler`'s 417, and the X-Request-ID of every answer."""
    unknown_host = (
        "sent by a browser to a host name that is not an IP address, localhost, *.localhost, "
        "app.host or listed in app.allowed_hosts"
    )
    other_site = "sent from a page of another site (websocket.allowed_origins)"
    for operations in spec["paths"].values():
        for method, operation in operations.items():
            why = (
                unknown_host
                if method.upper() in SAFE_METHODS
                else f"{other_site}, or {unknown_host}"
            )
            error = {"$ref": "#/definitions/Error"}
            operation["responses"].setdefault("403", {"schema": error, "description": why})
            operation["responses"].setdefault(
                "417",
                {"schema": error, "description": "an Expect header other than 100-continue"},
            )
            for response in operation["responses"].values():
                response["headers"] = {**response.get("headers", {}), **REQUEST_ID_HEADER}
