"""The service's HTTP API as the client uses it; every refusal carries the server's messages."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

JSON, CSV = "application/json", "text/csv"
HEALTH_SECONDS = 5.0  # /health only sets the rate's cap: not worth waiting long for
# Bytes of an answer read at most, but for a results file: the service's answers take KBs
# (an upload's duplicate-row warnings a few MB), and a server that streams without end
# (another program at --url, or a hostile one) took 1.4 GB of memory in 6 s, until
# aiohttp's total timeout of 5 minutes.
MAX_ANSWER = 64 * 2**20
MOST_CREATES_PER_MINUTE = 10**6  # a pace past it is no pace a directory keeps


class Refused(Exception):
    """The service refused the request or could not be reached, and nothing was done; or,
    when `unclear`, the request was sent and its answer lost (a 5xx, a cut connection, no
    answer, a proxy's page), so it may have been done all the same."""

    def __init__(
        self, summary: str, problems: list[str] | None = None, unclear: bool = False
    ) -> None:
        super().__init__(summary)
        self.summary, self.problems, self.unclear = summary, problems or [], unclear


def problems_of(body: Any) -> list[str]:
    """The service's error detail as lines: a message, or each problem with its place."""
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):
        return [
            f"{' '.join(str(part) for part in _listed(item.get('loc')))}: {item.get('msg')}"
            if isinstance(item, dict)
            else str(item)
            for item in detail
        ]
    return [str(detail)] if detail else []


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def lacking(body: Any, fields: tuple[str, ...]) -> list[str]:
    """The fields of an answer or message that are missing or null: what the client cannot
    do without (a batch's id, a message's version); any other may be null."""
    return [name for name in fields if body.get(name) is None]


@dataclass(frozen=True)
class ServiceApi:
    """Calls to one running service."""

    http: aiohttp.ClientSession
    base_url: URL

    def _at(self, path: str) -> URL:
        """`path` under the service's address, keeping its own path (a proxy's /hospitals)."""
        # A query or fragment of --url would swallow `path`: the service's address has none.
        base = self.base_url.with_query(None).with_fragment(None)
        return URL(str(base).rstrip("/") + path)

    async def _call(
        self,
        method: str,
        path: str,
        answer: str = JSON,
        needs: tuple[str, ...] = (),
        seen: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The body of a 2xx answer of the type `answer` names, with the fields it `needs`
        not null; Refused otherwise. `seen`, if given, takes the answer's headers (names in
        lower case: a proxy may have changed their case)."""
        url = self._at(path)
        try:
            async with self.http.request(method, url, **kwargs) as response:
                if response.method != method:  # a 301, 302 or 303 made a POST a GET
                    moved = str(response.url).removesuffix(path)
                    raise Refused(
                        f"{method} {path}: the service's address redirects to {moved} "
                        f"(HTTP {response.history[0].status}): use that as --url"
                    )
                kind, status = response.content_type, response.status
                if seen is not None:
                    seen.update((name.lower(), value) for name, value in response.headers.items())
                limit = None if kind == answer == CSV and status < 400 else MAX_ANSWER
                raw = await _read_at_most(response, limit)
                if raw is None:
                    raise Refused(
                        f"{method} {path} got HTTP {status} with an answer past "
                        f"{MAX_ANSWER} bytes, not the service's",
                        self._stranger(kind, None, status),
                        unclear=True,
                    )
                try:
                    text = raw.decode(response.charset or "utf-8")
                    body = json.loads(text) if kind == JSON else text
                except (ValueError, LookupError):  # not JSON after all, or not text
                    body = None
                if status >= 400:  # a 5xx is no refusal: the request may have been done
                    refused = "got no clear answer" if status >= 500 else "was refused"
                    said = problems_of(body) if kind == JSON else self._stranger(kind, body, status)
                    # Every answer of the service carries X-Request-ID, and only of a path it
                    # does not serve does it say "Not Found": another program's JSON (the
                    # directory's, at the wrong port) or a wrong prefix in --url.
                    if kind == JSON and (
                        "X-Request-ID" not in response.headers or said == ["Not Found"]
                    ):
                        said += self._stranger(kind, None, status)
                    raise Refused(
                        f"{method} {path} {refused} (HTTP {status})", said, unclear=status >= 500
                    )
                if kind != answer or (kind == JSON and not isinstance(body, dict)):
                    raise Refused(
                        f"{method} {path} got HTTP {status} with "
                        f"{kind or 'no content type'}, not the service's answer",
                        self._stranger(kind, None, status),
                        unclear=True,
                    )
                if missing := lacking(body, needs):
                    raise Refused(
                        f"{method} {path}: the answer lacks {', '.join(missing)}",
                        self._stranger(kind, None, status),
                        unclear=True,
                    )
                return body
        # Nothing was sent: refused, no route, or no answer to the SYN (sock_connect).
        except (
            aiohttp.ClientConnectorError,
            aiohttp.ConnectionTimeoutError,
            aiohttp.InvalidURL,
        ) as exc:
            raise Refused(f"cannot reach the service at {self.base_url}: {exc}") from exc
        except aiohttp.ClientError as exc:  # cut off once sent
            raise Refused(
                f"{method} {path}: lost the answer of the service at {self.base_url}: {exc}",
                unclear=True,
            ) from exc
        except TimeoutError as exc:  # aiohttp's own timeout (not a ClientError): no answer
            limit = kwargs.get("timeout", self.http.timeout).total
            within = "" if limit is None else f" within {limit:g} s"
            raise Refused(
                f"{method} {path}: no answer from the service at {self.base_url}{within}",
                unclear=True,
            ) from exc

    def _stranger(self, kind: str, body: Any, status: int) -> list[str]:
        """What to say of an answer that is not the service's JSON: a short plain-text
        reason as it is; a 5xx or 413 page as a proxy's (the service answers those in JSON);
        anything else (a web page) as a hint that --url is wrong."""
        text = body.strip() if kind == "text/plain" and isinstance(body, str) else ""
        if text and len(text) <= 300:
            return [text]
        if status >= 500 or status == 413:
            return [f"a proxy or gateway in front of the service answered (HTTP {status})"]
        return [f"is {self.base_url} the service's address? (--url, or SERVICE_URL)"]

    async def upload(
        self, path: Path, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """POST /batch/upload-csv; the accepted batch, and whether it is an earlier upload's
        of the same Idempotency-Key and file (Idempotent-Replayed: nothing new is created)."""
        try:
            content = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise Refused(f"cannot read {path}: {exc.strerror}") from exc
        form = aiohttp.FormData()
        form.add_field("file", content, filename=path.name, content_type="text/csv")
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        seen: dict[str, str] = {}
        try:
            body = await self._call(
                "POST",
                "/batch/upload-csv",
                needs=("batch_id",),
                seen=seen,
                data=form,
                headers=headers,
            )
            if not _is_uuid(body["batch_id"]):
                raise Refused(
                    "POST /batch/upload-csv: the answer's batch_id is not a batch id",
                    self._stranger(JSON, None, 200),
                    unclear=True,
                )
        except Refused as refused:
            if refused.unclear:  # uploading again could load every hospital twice
                refused.problems.append(
                    "the file may have been accepted all the same: "
                    + (
                        "upload it again with the same --idempotency-key, which answers "
                        "the batch it made if it was"
                        if idempotency_key is not None
                        else "look for it in GET /batch before uploading it again "
                        "(--idempotency-key makes a retried upload safe)"
                    )
                )
            raise
        return dict(body), seen.get("idempotent-replayed", "").lower() == "true"

    async def resume(self, batch_id: str) -> dict[str, Any]:
        """POST /batch/{id}/resume; the batch's progress."""
        body = await self._call("POST", f"/batch/{batch_id}/resume")
        return dict(body)

    async def rollback(self, batch_id: str) -> dict[str, Any]:
        """DELETE /batch/{id}; the batch's progress (rolled back, or rolling back)."""
        body = await self._call("DELETE", f"/batch/{batch_id}")
        return dict(body)

    async def progress(self, batch_id: str) -> dict[str, Any]:
        """GET /batch/{id}/progress, with its message."""
        body = await self._call("GET", f"/batch/{batch_id}/progress", needs=("current_message",))
        return dict(body)

    async def creates_per_minute(self, within: float = HEALTH_SECONDS) -> int:
        """The pace the service keeps to; 0 when it does not, or cannot say within the
        shorter of `within` and HEALTH_SECONDS seconds."""
        timeout = aiohttp.ClientTimeout(total=min(within, HEALTH_SECONDS))
        try:
            body = await self._call("GET", "/health", timeout=timeout)
        except Refused:  # unreachable, or unhealthy (503): the follow will say so
            return 0
        directory = body.get("directory") if isinstance(body, dict) else None
        pace = directory.get("creates_per_minute") if isinstance(directory, dict) else 0
        if not isinstance(pace, int) or isinstance(pace, bool):
            return 0
        return pace if 0 <= pace <= MOST_CREATES_PER_MINUTE else 0

    async def results_csv(self, batch_id: str, only_failed: bool) -> str:
        """GET /batch/{id}/results.csv, optionally only the failed rows."""
        query = "?only=failed" if only_failed else ""
        body = await self._call("GET", f"/batch/{batch_id}/results.csv{query}", CSV)
        return str(body)

    async def socket_refusal(self, batch_id: str, after: int | None, status: int) -> Refused:
        """Why the batch's websocket handshake was refused with `status`: that answer has no
        body, and the same request without the upgrade gets the service's reason."""
        try:
            await self._call("GET", f"/batch/{batch_id}/ws", params=_after(after))
        except Refused as refused:
            if status == 400:  # the service's answer to a handshake that lost its upgrade
                refused.problems.append(
                    "a proxy in front of the service must pass websocket upgrades on "
                    "(the Upgrade and Connection headers)"
                )
            return refused
        return Refused(f"websocket of batch {batch_id} refused (HTTP {status})")

    def socket_url(self, batch_id: str, after: int | None) -> URL:
        """The batch's websocket, resuming after a stream version when one is given."""
        scheme = "wss" if self.base_url.scheme == "https" else "ws"
        url = self._at(f"/batch/{batch_id}/ws").with_scheme(scheme)
        return url.with_query(_after(after))


async def _read_at_most(response: aiohttp.ClientResponse, limit: int | None) -> bytes | None:
    """The answer's body; None once it passes `limit` bytes (None: no limit)."""
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if limit is not None and size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _is_uuid(value: Any) -> bool:
    """Whether `value` is a batch id: a UUID, as the service writes one."""
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _after(version: int | None) -> dict[str, int]:
    """The query that resumes a batch's websocket after a stream version, if one is given."""
    return {} if version is None else {"after": version}
