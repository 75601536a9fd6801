"""/docs (Swagger UI, from aiohttp-apispec) and /redoc, both served locally, no CDN."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"
REDOC_PAGE = """<!DOCTYPE html>
<html>
  <head>
    <title>Hospital Batch Processor - ReDoc</title>
    <meta charset="utf-8"/>
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <style>body { margin: 0; padding: 0; }</style>
  </head>
  <body>
    <redoc spec-url="/openapi.json"></redoc>
    <script src="/static/redoc/redoc.standalone.js"></script>
  </body>
</html>
"""


async def redoc(request: web.Request) -> web.Response:
    """The ReDoc page for /openapi.json."""
    return web.Response(text=REDOC_PAGE, content_type="text/html")


def add_routes(app: web.Application) -> None:
    """Register /redoc and the static files it loads."""
    app.router.add_get("/redoc", redoc)
    app.router.add_static("/static/redoc", STATIC / "redoc")
