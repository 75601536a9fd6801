"""The Hospital Directory client: one pooled session, and every answer classified."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import aiohttp
import orjson
from aiohttp import hdrs

from service.settings import DirectorySettings


class Outcome(StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"
    REJECTED = "rejected"  # the directory answered and refused: repeating gives the same
    RATE_LIMITED = "rate_limited"  # 429: not processed; wait for the window to pass
    NOT_SENT = "not_sent"  # provably never processed (no connection): safe to repeat
    AMBIGUOUS = "ambiguous"  # may have been processed: never repeat a create blindly


@dataclass(frozen=True)
class Answer:
    outcome: Outcome
    status: int | None
    body: Any
    message: str

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass
class Reachability:
    """What /health reports about the directory: the last call's fate."""

    reachable: bool | None = None
    last_call_at: float | None = None
    last_success_at: float | None = None
    last_error: str | None = None


# The most of an answer read: a hospital or a batch's 20 take a few KB. A proxy's or a
# broken server's answer of gigabytes, 20 at a time, would end the service for want of memory.
MAX_ANSWER_BYTES = 16 * 2**20

# How the directory says a batch has no hospitals (GET, activate and delete of a batch).
NO_SUCH_BATCH = "No hospitals found with the specified batch ID"


def _in_its_words(answer: Answer) -> Answer:
    """A batch's 404 proves it empty only in the directory's own words: any other 404 (a
    wrong path, a proxy's page) proves nothing, so it is read as unclear."""
    if answer.outcome is Outcome.NOT_FOUND and answer.message != NO_SUCH_BATCH:
        return replace(answer, outcome=Outcome.AMBIGUOUS, message=f"404: {answer.message}")
    return answer


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _resetting_socket(addr_info: aiohttp.AddrInfoType) -> socket.socket:
    """A socket whose close resets the connection and drops what the peer has not acked.

    A graceful close leaves a request the path has not delivered (a blackhole, heavy loss) to
    the kernel, which keeps retransmitting it for minutes after the client gave up: a create
    would then reach the directory long after the check that found no record of it, and
    the row be stored twice. A reset takes it back instead.
    """
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


def _message(body: Any, status: int) -> str:
    """The directory's own words: `detail` (a string or FastAPI's list), or 429's `error`."""
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error"))
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(map(_said, detail))
    return f"HTTP {status}"


def _said(item: Any) -> str:
    """One of FastAPI's validation errors, `field: msg`; whatever else as it reads, since a
    proxy's or another server's `detail` need not have a list for `loc`."""
    if not isinstance(item, dict):
        return str(item)
    loc = item.get("loc")
    where = loc[1:] if isinstance(loc, list) else [] if loc is None else [loc]
    return f"{'.'.join(map(str, where))}: {item.get('msg')}"


def _one_each(listing: list[Any]) -> list[dict[str, Any]] | None:
    """A batch listing's hospitals, each once; None when an entry is not a hospital with an
    id, or one id stands for two different records. A record listed twice is one hospital:
    counted twice, it would let two identical rows claim it."""
    hospitals: dict[int, dict[str, Any]] = {}
    for hospital in listing:
        if not isinstance(hospital, dict) or type(hospital.get("id")) is not int:
            return None
        if hospitals.setdefault(hospital["id"], hospital) != hospital:
            return None
    return list(hospitals.values())


async def _body(response: aiohttp.ClientResponse) -> bytes:
    """The answer's body, or ValueError past MAX_ANSWER_BYTES (read as unclear)."""
    if response.content_length is not None:
        if response.content_length > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer of {response.content_length:,} bytes")
        # aiohttp reads no more than the length says, unless it decompresses: a 200 KB
        # gzip answer declares its 200 KB and expands to 200 MB.
        if hdrs.CONTENT_ENCODING not in response.headers:
            return await response.read()
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer of more than {MAX_ANSWER_BYTES:,} bytes")
    return bytes(body)


def classify(status: int, body: Any) -> Answer:
    """Map a status code to what it proves about the request."""
    if 200 <= status < 300:
        return Answer(Outcome.OK, status, body, "ok")
    if status == 429:
        outcome = Outcome.RATE_LIMITED
    elif status == 404:
        outcome = Outcome.NOT_FOUND
    elif status >= 500:
        outcome = Outcome.AMBIGUOUS
    else:
        outcome = Outcome.REJECTED
    return Answer(outcome, status, body, _message(body, status))


class DirectoryClient:
    """Calls the directory on one ClientSession; never raises for network trouble."""

    def __init__(self, session: aiohttp.ClientSession, settings: DirectorySettings) -> None:
        self.base_url = settings.base_url.rstrip("/")
        self.reachability = Reachability()
        self._answered_at: float | None = None  # time.monotonic() of the last answer
        self._session = session
        self._read_timeout = settings.read_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
        )
        self._warmup_timeout = aiohttp.ClientTimeout(
            total=settings.warmup_timeout, sock_connect=settings.connect_timeout
        )

    @staticmethod
    def new_session(settings: DirectorySettings) -> aiohttp.ClientSession:
        """A session of `concurrency` connections: no more requests than that are ever in
        flight (the directory asks for 20 at most), creates, reads and activations together."""
        connector = aiohttp.TCPConnector(
            limit=settings.concurrency, socket_factory=_resetting_socket
        )
        return aiohttp.ClientSession(
            connector=connector, raise_for_status=False, json_serialize=_json
        )

    async def create(
        self, name: str, address: str, phone: str | None, creation_batch_id: str
    ) -> Answer:
        """POST /hospitals/ with the batch id in the body."""
        body = {
            "name": name,
            "address": address,
            "phone": phone,
            "creation_batch_id": creation_batch_id,
        }
        return await self._call("POST", "/hospitals/", json=body)

    async def batch_members(self, creation_batch_id: str) -> Answer:
        """GET /hospitals/batch/{id}; the directory's 404 for an empty batch reads as []."""
        answer = _in_its_words(await self._call("GET", f"/hospitals/batch/{creation_batch_id}"))
        if answer.outcome is Outcome.NOT_FOUND:
            return replace(answer, outcome=Outcome.OK, body=[])
        if not answer.ok:
            return answer
        hospitals = _one_each(answer.body) if isinstance(answer.body, list) else None
        if hospitals is None:
            said = "the batch listing is not a list of hospitals, each with one record"
            return replace(answer, outcome=Outcome.AMBIGUOUS, body=None, message=said)
        return replace(answer, body=hospitals)

    async def activate(self, creation_batch_id: str) -> Answer:
        """PATCH /hospitals/batch/{id}/activate: not idempotent, never repeat it blindly."""
        return _in_its_words(
            await self._call("PATCH", f"/hospitals/batch/{creation_batch_id}/activate")
        )

    async def delete_batch(self, creation_batch_id: str) -> Answer:
        """DELETE /hospitals/batch/{id}; a 404 means nothing (left) to delete."""
        return _in_its_words(await self._call("DELETE", f"/hospitals/batch/{creation_batch_id}"))

    async def warm_up(self) -> Answer:
        """GET / with a long timeout, to wake a directory that sleeps when idle."""
        return await self._call("GET", "/", timeouts=self._warmup_timeout)

    async def _call(
        self,
        method: str,
        path: str,
        json: dict[str, Any] | None = None,
        timeouts: aiohttp.ClientTimeout | None = None,
    ) -> Answer:
        try:
            async with self._session.request(
                method,
                self.base_url + path,
                json=json,
                timeout=timeouts or self._timeout,
                allow_redirects=False,
            ) as response:
                # sock_read bounds each wait for bytes; this bounds an answer that drips.
                async with asyncio.timeout(self._read_timeout):
                    raw = await _body(response)
                try:
                    body = orjson.loads(raw) if raw else None
                except ValueError:
                    if 200 <= response.status < 300:
                        raise  # a success must be readable: what it said may have happened
                    body = None  # a proxy's error page: the status alone tells the outcome
                answer = classify(response.status, body)
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            answer = Answer(Outcome.NOT_SENT, None, None, f"cannot connect: {exc}")
        except (OSError, aiohttp.ClientError, ValueError) as exc:
            # Sent, then the answer timed out, was cut off or unreadable: it may have run.
            answer = Answer(Outcome.AMBIGUOUS, None, None, f"{type(exc).__name__}: {exc}")
        self._record(answer)
        return answer

    def _record(self, answer: Answer) -> None:
        r = self.reachability
        r.last_call_at = time.time()
        if answer.status is not None and answer.outcome is not Outcome.AMBIGUOUS:
            r.reachable, r.last_success_at, r.last_error = True, r.last_call_at, None
            self._answered_at = time.monotonic()
        else:
            r.reachable, r.last_error = False, answer.message

    def idle_for(self) -> float:
        """Seconds since the directory last answered, infinite if it never did."""
        last = self._answered_at
        return float("inf") if last is None else time.monotonic() - last
