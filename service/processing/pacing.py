"""Pacing calls to the directory's fixed rate-limit windows, retry backoff, and the waits
a stop cuts short."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any


class WindowPacer:
    """Lets at most `per_window` calls start in each fixed window, as the directory counts
    an endpoint's calls (creates, or one kind of call on upstream batches).

    The directory's window starts at the first request it sees and lasts `window`
    seconds; ours starts when we send, a little earlier, so each of ours lasts `margin`
    longer. A full window's worth can leave at once: a 20-row file goes out as one burst.

    After a restart, where the directory's open window began is not known: any of the
    creates replayed from the log may have opened it. Until a window and margin pass with
    no create, at most `per_window` start in any window and margin, which keeps to every
    window the directory may count, wherever it began.
    """

    def __init__(
        self,
        per_window: int,
        window: float,
        margin: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_window, self.window, self.margin = per_window, window, margin
        self._clock = clock
        self._in_window: list[float] = []  # when each call of the open window was counted
        self._blocked_until = 0.0
        self._since_replay: deque[float] = deque()  # creates while windows are not known

    async def acquire(self) -> float | None:
        """Wait until one more call may be sent, and count it: the time it was counted at,
        for `unused`. With per_window 0 (pacing off) nothing is counted (None), but a 429
        still holds calls back a whole window."""
        await self.room()
        if self.per_window <= 0:
            return None
        now = self._clock()
        if self._since_replay:
            self._since_replay.append(now)
        elif not self._in_window or now >= self._window_end():
            self._in_window = [now]
        else:
            self._in_window.append(now)
        return now

    def unused(self, counted_at: float | None) -> None:
        """The call counted at `counted_at` never reached the directory (no connection):
        it takes no place in any window the directory counts, nor opens one."""
        for counted in (self._since_replay, self._in_window):
            if counted_at is not None and counted_at in counted:
                counted.remove(counted_at)
                return

    def replay(self, sent: list[float]) -> None:
        """Count creates sent before this pacer existed (times no earlier than each was
        sent, on its clock, oldest first): after a restart the directory's window may
        still be open, and what it already took is no longer ours to send."""
        if self.per_window > 0:
            self._since_replay.extend(sent)

    async def room(self) -> None:
        """Wait until one more call could be sent, without counting it."""
        while True:
            wait = self._until_room()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    def has_room(self) -> bool:
        """Whether one more call could be sent now."""
        return self._until_room() <= 0

    def seconds_to_room(self) -> float:
        """How long until one more call could be sent (0: now)."""
        return max(0.0, self._until_room())

    def _until_room(self) -> float:
        now = self._clock()
        if self._blocked_until > now:
            return self._blocked_until - now
        if self.per_window <= 0:
            return 0.0
        recent = self._since_replay
        while recent and recent[0] <= now - self.window - self.margin:
            recent.popleft()
        if len(recent) >= self.per_window:
            return recent[-self.per_window] + self.window + self.margin - now
        if recent:
            return 0.0
        if not self._in_window or now >= self._window_end():
            return 0.0
        if len(self._in_window) < self.per_window:
            return 0.0
        return self._window_end() - now

    def _window_end(self) -> float:
        """Where the open window ends: it began with the first call the directory saw."""
        return self._in_window[0] + self.window + self.margin

    def refused(self) -> bool:
        """A 429 came back: someone else's traffic shares our window; wait a whole one.
        False when calls were held back already (by a 429 of the same burst)."""
        now = self._clock()
        fresh = self._blocked_until <= now
        self._blocked_until = now + self.window + self.margin
        self._in_window = []
        return fresh


class Lookahead:
    """How many rows each worker gets ready (their intents committed) ahead of its create.

    Rows got ready together share one intent event and one commit, so looking further
    ahead costs fewer commits a row; against a directory that answers in milliseconds,
    commits are what bound the pace. But a batch uploaded meanwhile waits behind the rows
    already got ready: the depth keeps that wait under `budget` seconds, which against
    the real directory (5 s a create) means one row ahead.
    """

    def __init__(self, most: int, budget: float, weight: float = 0.1) -> None:
        self.most, self.budget, self._weight = most, budget, weight
        self._create: float | None = None  # moving average of a create's answer time

    def created(self, seconds: float) -> None:
        """A create took `seconds` to answer."""
        if self._create is None:
            self._create = seconds
        else:
            self._create += self._weight * (seconds - self._create)

    def depth(self) -> int:
        """Rows to have on their way to ready while one is sent (1 until a create answered)."""
        if not self._create:
            return 1
        return max(1, min(self.most, int(self.budget / self._create)))


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential delay with full jitter for retry number `attempt` (1, 2, ...)."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt - 1, 32)))


class Pauses:
    """Waits between calls to the directory (a window, a back-off, a settle): a stop ends
    them at once, where a call in flight gets the grace to be answered and recorded.

    Whatever a stop cuts off here has sent nothing yet, and the next start picks the work
    up from the log.
    """

    def __init__(self) -> None:
        self._waiting: set[asyncio.Task[Any]] = set()
        self._stopped = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Around a wait: the task is cancelled if the pool stops during it, and once it
        has stopped no wait (and so no call after one) begins."""
        if self._stopped:
            raise asyncio.CancelledError("the pool is stopping")
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            yield
        finally:
            self._waiting.discard(task)

    async def sleep(self, seconds: float) -> None:
        with self.held():
            await asyncio.sleep(seconds)

    def stop(self) -> None:
        self._stopped = True
        for task in self._waiting:
            task.cancel()
