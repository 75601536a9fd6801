"""Browsers name the page a request comes from in `Origin`: a page of another site may not
follow a batch over a websocket, nor change anything through this API. Nor may a site whose
name was made to point here (DNS rebinding) pass for the service's own pages."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from service.web.errors import ApiError, Handler
from service.web.keys import SETTINGS

# What a page of another site can send only after a CORS preflight, which this API never
# grants, is everything but these; a POST of a form (multipart, as uploads are) needs none.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def origin_allowed(request: web.Request) -> bool:
    """Whether the request names no origin, the host it was sent to, or one listed in
    websocket.allowed_origins (`*` allows any), or the browser says it is same-origin.
    Clients that send no Origin (command-line tools, servers) are not browsers and pass."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    # A proxy that rewrites Host (nginx's default) makes the service's own pages look
    # foreign; the browser's Sec-Fetch-Site, which no page can set, still tells.
    if request.headers.get("Sec-Fetch-Site") == "same-origin":
        return True
    allowed = request.app[SETTINGS].websocket.allowed_origins
    try:
        same_host = urlsplit(origin).netloc.lower() == request.host.lower()
    except ValueError:  # "http://[::1": not an origin a browser sends, and not ours
        same_host = False
    return same_host or origin in allowed or "*" in allowed


@web.middleware
async def same_origin_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse an upload, resume or rollback that a page of another site sent.

    A browser posts a form from any page without asking first: any page that a user who
    can reach the service opened could otherwise create hospitals in the directory.
    """
    if (
        request.method not in SAFE_METHODS
        and request.match_info.http_exception is None  # 404 and 405 answer as they did
        and not origin_allowed(request)
    ):
        origin = request.headers["Origin"]
        raise ApiError(
            403,
            f"{request.method} from origin {origin!r} refused: a page of another site may not "
            "change anything here; add the origin to websocket.allowed_origins to allow it",
        )
    return await handler(request)


def host_known(request: web.Request) -> bool:
    """Whether a browser sent the request to an IP address, localhost, app.host or a name in
    app.allowed_hosts (`*` allows any). Requests without Origin or Sec-Fetch-Site are not a
    browser's and pass, whatever name they were sent to."""
    headers = request.headers
    if "Origin" not in headers and "Sec-Fetch-Site" not in headers:
        return True
    try:
        name = (urlsplit(f"//{request.host}").hostname or "").rstrip(".")
    except ValueError:  # "[::1": no browser sends it
        return False
    try:
        ipaddress.ip_address(name)
        return True  # a page served from an address is of that address: nothing rebound
    except ValueError:
        pass
    app = request.app[SETTINGS].app
    known = {app.host.lower(), *(host.lower().rstrip(".") for host in app.allowed_hosts)}
    return name in known or "*" in known or name == "localhost" or name.endswith(".localhost")


@web.middleware
async def known_hosts(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what a browser sent to a name the service was not told it has.

    A site can make its own name point at this service's address, after its page loaded:
    the page's requests are then same-origin to the browser, and its Origin matches Host.
    """
    if not host_known(request):
        raise ApiError(
            403,
            f"host {request.host!r} refused: a browser may reach this service by its IP "
            "address, localhost or a name listed in app.allowed_hosts (APP_ALLOWED_HOSTS)",
        )
    return await handler(request)
