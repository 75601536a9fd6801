"""Pacing creates to the directory's fixed rate-limit window, and retry backoff."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable


class WindowPacer:
    """Lets at most `per_window` creates start in each fixed window, like the directory counts.

    The directory's window starts at the first request it sees and lasts `window`
    seconds; ours starts when we send, a little earlier, so each of ours lasts `margin`
    longer. A full window's worth can leave at once: a 20-row file goes out as one burst.
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
        self._window_start: float | None = None
        self._used = 0
        self._blocked_until = 0.0

    async def acquire(self) -> None:
        """Wait until one more create may be sent; pacing off when per_window is 0."""
        if self.per_window <= 0:
            return
        while True:
            now = self._clock()
            wait = self._blocked_until - now
            if wait <= 0:
                end = (self._window_start or 0.0) + self.window + self.margin
                if self._window_start is None or now >= end:
                    self._window_start, self._used = now, 0
                if self._used < self.per_window:
                    self._used += 1
                    return
                wait = end - now
            await asyncio.sleep(wait)

    def refused(self) -> None:
        """A 429 came back: someone else's traffic shares our window; wait a whole one."""
        self._blocked_until = self._clock() + self.window + self.margin
        self._window_start = None


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential delay with full jitter for retry number `attempt` (1, 2, ...)."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt - 1, 32)))
