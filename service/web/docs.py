"""/docs (Swagger UI, the bundle aiohttp-apispec ships) and /redoc, both served locally, no CDN."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp_apispec
from aiohttp import web

STATIC = Path(__file__).parent / "static"
SWAGGER_STATIC = Path(aiohttp_apispec.__file__).parent / "static"
# aiohttp-apispec's own page leaves Swagger UI's validatorUrl at its default: a browser that
# opens /docs on any host but localhost then loads a badge from validator.swagger.io, giving
# it this service's spec address. This page is the same, with the validator off. Swagger UI
# 4.1.0 also takes its options from the query string (CVE-2018-25031: `?url=` shows another
# spec on this origin, `?validatorUrl=` turns the validator back on): the page drops it first.
SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>Hospital Batch Processor - Swagger UI</title>
    <link rel="stylesheet" type="text/css" href="/static/swagger/swagger-ui.css">
    <link rel="icon" type="image/png" href="/static/swagger/favicon-32x32.png" sizes="32x32">
    <style>body { margin: 0; background: #fafafa; }</style>
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="/static/swagger/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="/static/swagger/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script>
      window.onload = function() {
        if (window.location.search) {
          history.replaceState(null, "", window.location.pathname + window.location.hash);
        }
        window.ui = SwaggerUIBundle({
          url: "/openapi.json",
          dom_id: "#swagger-ui",
          deepLinking: true,
          validatorUrl: null,
          presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
          plugins: [SwaggerUIBundle.plugins.DownloadUrl],
          layout: "StandaloneLayout"
        });
      };
    </script>
  </body>
</html>
"""
# What the pages load. Not the bundle's own .html pages: its index.html takes the same
# options from the query string, and the OAuth2 redirect page serves no flow of this API.
ASSETS = frozenset({".js", ".css", ".png", ".map"})
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


# What the pages may load beyond their scripts and styles. ReDoc's bundle puts an <img> of
# https://cdn.redoc.ly/redoc/logo-mini.svg in its sidebar ("API docs by Redocly") whatever
# its options: every browser that opened /redoc fetched it, naming this service's origin in
# its Referer. Images come from here (or are inline data), the pages fetch nothing but this
# service (the spec, and Swagger UI's "Try it out"), and no other site may frame them to
# have a user click "Execute" on a rollback. Scripts and styles are left as they are: both
# bundles inline styles, and ReDoc compiles schemas with `new Function`.
PAGE_POLICY = "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"


def _page(html: str) -> web.Response:
    return web.Response(
        text=html, content_type="text/html", headers={"Content-Security-Policy": PAGE_POLICY}
    )


async def swagger(request: web.Request) -> web.Response:
    """The Swagger UI page for /openapi.json."""
    return _page(SWAGGER_PAGE)


async def redoc(request: web.Request) -> web.Response:
    """The ReDoc page for /openapi.json."""
    return _page(REDOC_PAGE)


def files_in(
    folder: Path, suffixes: frozenset[str]
) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    """A handler serving the files `folder` holds at start whose names end in one of
    `suffixes`, by name, and nothing else.

    aiohttp's static route answers a name it cannot open with an empty 404 of its own, and
    how far a name gets before that depends on the Python version; a fixed list needs no
    path resolved, and any other name gets this API's 404.
    """
    files = {
        path.name: path for path in folder.iterdir() if path.is_file() and path.suffix in suffixes
    }

    async def serve(request: web.Request) -> web.FileResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    return serve


def add_routes(app: web.Application) -> None:
    """Register /docs, /redoc and the static files they load."""
    app.router.add_get("/docs", swagger)
    app.router.add_get("/static/swagger/{name}", files_in(SWAGGER_STATIC, ASSETS))
    app.router.add_get("/redoc", redoc)
    app.router.add_get("/static/redoc/{name}", files_in(STATIC / "redoc", ASSETS))
