"""One batch's facts, appended together: each commit carries whatever was emitted meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from service.store.records import NewEvent, StoredEvent

Append = Callable[[list[NewEvent]], Awaitable[list[StoredEvent]]]
Intent = Callable[[tuple[int, ...], tuple[int, ...]], NewEvent]
Spawn = Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]


@dataclass(eq=False)
class _Entry:
    """One fact waiting for its append, or (with `new` None) the rows about to be sent."""

    new: NewEvent | None = None
    rows: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    stored: asyncio.Future[list[StoredEvent]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Outbox:
    """The facts that one batch's workers emit, appended together.

    Whatever is emitted while an append of the batch commits goes into the next append,
    in the order it was emitted, so a busy batch costs one append per commit rather than
    one per fact. The rows that workers are about to send share one intent event in it,
    placed where the first of them was requested.
    """

    def __init__(self, append: Append, intent: Intent, spawn: Spawn) -> None:
        self._append, self._intent, self._spawn = append, intent, spawn
        self._next: list[_Entry] = []
        self._requests: _Entry | None = None  # the next append's intent, while rows join it
        self._draining: asyncio.Task[None] | None = None

    async def emit(self, new: NewEvent) -> list[StoredEvent]:
        """Append one fact; return its append's stored events (its neighbours' included)."""
        entry = _Entry(new)
        self._next.append(entry)
        return await self._wait(entry)

    async def request(self, row: int, attempt: int) -> list[StoredEvent]:
        """Record that `row` is about to be sent, on `attempt`, along with any other rows."""
        if self._requests is None:
            self._requests = _Entry()
            self._next.append(self._requests)
        self._requests.rows.append(row)
        self._requests.attempts.append(attempt)
        return await self._wait(self._requests)

    async def _wait(self, entry: _Entry) -> list[StoredEvent]:
        if self._draining is None:
            self._draining = self._spawn(self._drain())
        return await asyncio.shield(entry.stored)

    async def _drain(self) -> None:
        entries: list[_Entry] = []
        try:
            while self._next:
                entries, self._next, self._requests = self._next, [], None
                news: list[NewEvent] = []  # stays short if building an intent fails
                try:
                    news = [
                        e.new
                        if e.new is not None
                        else self._intent(tuple(e.rows), tuple(e.attempts))
                        for e in entries
                    ]
                    stored = await self._append(news)
                except Exception as exc:
                    if len(entries) == 1 or len(news) != len(entries):
                        for entry in entries:
                            entry.stored.set_exception(exc)
                        continue
                    # One refused fact must not sink its neighbours: append each on its own.
                    for entry, new in zip(entries, news, strict=True):
                        try:
                            entry.stored.set_result(await self._append([new]))
                        except Exception as one:
                            entry.stored.set_exception(one)
                else:
                    for entry in entries:
                        entry.stored.set_result(stored)
        finally:
            self._draining = None
            for entry in (*entries, *self._next):  # cut off by the pool stopping
                if not entry.stored.done():
                    entry.stored.cancel()
            self._next, self._requests = [], None
