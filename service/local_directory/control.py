"""The stand-in's HTTP control surface under /_standin/ (only with `control` enabled)."""

from __future__ import annotations

import json
import sys
from typing import Any

from aiohttp import web

from service.local_directory.options import CONTROL_PREFIX
from service.local_directory.standin import STANDIN_KEY


async def state(request: web.Request) -> web.Response:
    """Request counts, hospitals per batch, duplicates, delays and faults."""
    return web.json_response(request.app[STANDIN_KEY].state())


async def set_delay(request: web.Request) -> web.Response:
    """Body `{"create_delay": s, "jitter": s}`."""
    body = await _json_object(request)
    standin = request.app[STANDIN_KEY]
    standin.set_delay(_seconds(body, "create_delay"), _seconds(body, "jitter", default=0.0))
    return _done(create_delay=standin.create_delay, jitter=standin.jitter)


async def add_fault(request: web.Request) -> web.Response:
    """Body `{"endpoint", "kind", "probability"?, "nth"?, "seed"?}`."""
    body = await _json_object(request)
    try:
        rule = request.app[STANDIN_KEY].add_fault(
            body.get("endpoint", ""),
            body.get("kind", ""),
            probability=body.get("probability"),
            nth=body.get("nth"),
            seed=body.get("seed"),
        )
    except (TypeError, ValueError) as exc:
        raise _bad_request(str(exc)) from exc
    return _done(fault=rule.describe())


async def clear_faults(request: web.Request) -> web.Response:
    """Remove every injected fault."""
    request.app[STANDIN_KEY].clear_faults()
    return _done()


async def cold_start(request: web.Request) -> web.Response:
    """Body `{"seconds": s}`: the next request waits that long."""
    seconds = _seconds(await _json_object(request), "seconds")
    request.app[STANDIN_KEY].cold_start(seconds)
    return _done(cold_start=seconds)


async def restart(request: web.Request) -> web.Response:
    """Wipe every hospital and rate window; ids start again at 1."""
    request.app[STANDIN_KEY].restart()
    return _done()


def add_control_routes(router: web.UrlDispatcher) -> None:
    """Register the control surface."""
    router.add_get(f"{CONTROL_PREFIX}state", state, allow_head=False)
    router.add_post(f"{CONTROL_PREFIX}delay", set_delay)
    router.add_post(f"{CONTROL_PREFIX}faults", add_fault)
    router.add_delete(f"{CONTROL_PREFIX}faults", clear_faults)
    router.add_post(f"{CONTROL_PREFIX}cold-start", cold_start)
    router.add_post(f"{CONTROL_PREFIX}restart", restart)


def _done(**fields: Any) -> web.Response:
    return web.json_response({"standin": True, **fields})


def _bad_request(reason: str) -> web.HTTPBadRequest:
    body = json.dumps({"standin": True, "error": reason})
    return web.HTTPBadRequest(text=body, content_type="application/json")


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise _bad_request(f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _bad_request("body must be a JSON object")
    return body


def _seconds(body: dict[str, Any], name: str, default: float | None = None) -> float:
    value = body.get(name, default)
    # Up to the largest float: a longer integer is finite, but float() of it overflows.
    largest = sys.float_info.max
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= largest:
        raise _bad_request(f"{name} must be a finite number of seconds >= 0")
    return float(value)
