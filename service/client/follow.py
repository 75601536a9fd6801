"""Following a batch over its websocket to the end, reconnecting with ?after when cut off."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, cast

import aiohttp

from service.client.api import Refused, ServiceApi, lacking

RESYNC = 4000  # the service says we fell behind: reconnect at once with ?after
HEARTBEAT_SECONDS = 20.0  # ping the service; a silent one is dropped and reconnected
FIRST_RETRY_SECONDS = 0.2
LONGEST_RETRY_SECONDS = 5.0
# A socket quiet this long: /progress says why (the directory's rate window, most often).
QUIET_SECONDS = 10.0
# A socket open this long was contact, even without a message: a proxy may drop idle ones.
CONTACT_SECONDS = 1.0

Message = dict[str, Any]
# The messages of a batch's socket the client shows, and the fields it cannot show one
# without; any other frame (a later service's kind, a proxy's page) is skipped.
KINDS = {
    "snapshot": ("version", "progress"),
    "event": ("version", "progress"),
    "finished": ("version", "progress", "status"),
}


class LostContact(Exception):
    """The websocket could not be reopened within the patience allowed."""


async def follow(
    api: ServiceApi,
    batch_id: str,
    show: Callable[[Message], None],
    note: Callable[[str], None],
    patience: float,
    aside: Callable[[str], None],
) -> Message:
    """Pass every message to `show` until the batch finishes; the `finished` message.

    While the socket stays quiet (no event for QUIET_SECONDS), `/progress`'s message goes
    to `aside`, which is how a wait for the directory's rate window shows.

    A closed or dropped socket is reopened with ?after=<last version seen>, so no event is
    lost or shown twice. Once reopening has failed for `patience` seconds, LostContact; a
    socket that is open but quiet is waited on for as long as it stays open, and one that
    stayed open CONTACT_SECONDS counts as contact when it closes.
    """
    after: int | None = None
    loop = asyncio.get_running_loop()
    lost_since: float | None = None
    retry = FIRST_RETRY_SECONDS
    while True:
        code: int | None = None
        began, opened = loop.time(), None
        try:
            # A handshake nobody answers (a proxy that holds upgrades) is contact lost too:
            # it may take only what is left of the patience.
            left = patience if lost_since is None else patience - (began - lost_since)
            ws = await _handshake(api, batch_id, after, max(left, FIRST_RETRY_SECONDS))
            opened = loop.time()
            async with ws:
                quiet_from = loop.time() + QUIET_SECONDS
                while True:
                    try:
                        # A deadline, not receive()'s timeout: that starts again with every
                        # ping and pong, so a service pinging more often than QUIET_SECONDS
                        # (websocket.heartbeat_seconds) kept a quiet socket from counting.
                        async with asyncio.timeout_at(quiet_from):
                            msg = await ws.receive()
                    except TimeoutError:
                        await _say_why_quiet(api, batch_id, aside)
                        quiet_from = loop.time() + QUIET_SECONDS
                        continue
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    message = _message(msg.data)
                    if message is None:
                        continue
                    show(message)
                    quiet_from = loop.time() + QUIET_SECONDS
                    after, lost_since, retry = message["version"], None, FIRST_RETRY_SECONDS
                    if message["type"] == "finished":
                        return message
            code = ws.close_code
            reason = f"the service closed the websocket (code {code})"
        except aiohttp.WSServerHandshakeError as exc:
            if 400 <= exc.status < 500:
                raise await api.socket_refusal(batch_id, after, exc.status) from exc
            reason = f"websocket handshake failed (HTTP {exc.status})"
        except (aiohttp.ClientError, OSError) as exc:
            reason = f"connection lost ({exc or type(exc).__name__})"
        now = loop.time()
        if opened is not None and now - opened >= CONTACT_SECONDS:  # quiet, not lost
            lost_since, retry = now, FIRST_RETRY_SECONDS
        elif lost_since is None:  # a handshake that failed: contact was missing since it began
            lost_since = began if opened is None else now
        if now - lost_since > patience:
            raise LostContact(f"{reason}; gave up after {patience:g}s")
        where = "from the start" if after is None else f"after version {after}"
        note(f"{reason}; reconnecting {where}")
        if code != RESYNC:  # no later than the patience allows: a last try comes at its end
            await asyncio.sleep(min(retry, patience - (now - lost_since)))
            retry = min(retry * 2, LONGEST_RETRY_SECONDS)


def _message(frame: str) -> Message | None:
    """A text frame as a message the client shows; None for any other."""
    try:
        message = json.loads(frame)
    except ValueError:
        return None
    needs = KINDS.get(str(message.get("type"))) if isinstance(message, dict) else None
    if needs is None or lacking(message, needs):
        return None
    # What the client reads these as: a version to resume after, and objects of numbers and
    # text (a list or a string there, from a proxy or a hostile server, was a traceback).
    version = message["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        return None
    if any(not isinstance(message[part], dict) for part in ("progress", "status") if part in needs):
        return None
    return cast(Message, message)


async def _handshake(
    api: ServiceApi, batch_id: str, after: int | None, limit: float
) -> aiohttp.ClientWebSocketResponse:
    """The batch's websocket, opened within `limit` seconds."""
    # The snapshot and `finished` messages carry the whole /status, which a large
    # batch takes past aiohttp's default 4 MiB a message (closed 1009, forever).
    opening = api.http.ws_connect(
        api.socket_url(batch_id, after), heartbeat=HEARTBEAT_SECONDS, max_msg_size=0
    )
    try:
        return await asyncio.wait_for(opening, limit)
    except TimeoutError as exc:
        if isinstance(exc, aiohttp.ClientError):  # aiohttp's own, which says what it was
            raise
        raise aiohttp.ServerTimeoutError(
            f"no answer to the websocket handshake within {round(limit, 1):g}s"
        ) from exc


async def _say_why_quiet(api: ServiceApi, batch_id: str, aside: Callable[[str], None]) -> None:
    try:
        # No longer than the quiet spell (its TimeoutError is an OSError): a service that
        # stopped answering held the socket's watch, and so the reconnect timeout, 5 minutes.
        async with asyncio.timeout(QUIET_SECONDS):
            progress = await api.progress(batch_id)
    except (Refused, aiohttp.ClientError, OSError):  # the socket, not this, says if it is lost
        return
    aside(str(progress["current_message"]))
