"""Building the stand-in application and serving it on a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from service.local_directory.control import add_control_routes
from service.local_directory.handlers import add_directory_routes
from service.local_directory.middleware import directory_conditions, fastapi_answers
from service.local_directory.options import DirectoryOptions
from service.local_directory.standin import STANDIN_KEY, StandIn

_SHUTDOWN_TIMEOUT_SECONDS = 5.0


def create_directory_app(options: DirectoryOptions | None = None) -> web.Application:
    """The local Hospital Directory stand-in as an aiohttp application."""
    options = options or DirectoryOptions()
    # No body size limit (0): the directory sets no maximum length on names and addresses,
    # where aiohttp would answer a body over 1 MiB with a plain-text 413.
    app = web.Application(middlewares=[directory_conditions, fastapi_answers], client_max_size=0)
    app[STANDIN_KEY] = StandIn(options)
    add_directory_routes(app.router)
    if options.control:
        add_control_routes(app.router)
    app.on_shutdown.append(_release_requests)
    return app


async def _release_requests(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for in-flight handlers: ending hangs, cold starts
    # and create sleeps here keeps shutdown quick instead of waiting out the timeout.
    await app[STANDIN_KEY].close()


@dataclass(frozen=True)
class RunningDirectory:
    """A stand-in served on a socket: its base URL and its state."""

    url: str
    standin: StandIn


@asynccontextmanager
async def run_directory(
    options: DirectoryOptions | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningDirectory]:
    """Serve a stand-in on `host:port` (0 picks a free port) until the block exits."""
    app = create_directory_app(options)
    # handler_cancellation stays off (aiohttp's default): like the directory's threads, a
    # handler keeps running after its client leaves.
    runner = web.AppRunner(app, shutdown_timeout=_SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        url = str(URL.build(scheme="http", host=host, port=bound_port))
        yield RunningDirectory(url=url, standin=app[STANDIN_KEY])
    finally:
        await runner.cleanup()
