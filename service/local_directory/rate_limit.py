"""Fixed-window rate limiting, as slowapi's default strategy counts."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class FixedWindowLimiter:
    """Per-key counters in windows that open at a key's first request and last `window` s.

    Unlike a sliding window, every slot comes back at once when the window closes.
    """

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._clock = clock
        self._windows: dict[Hashable, tuple[float, int]] = {}

    def allow(self, key: Hashable, limit: int) -> bool:
        """Count one request for `key`; False when the window already holds `limit`."""
        now = self._clock()
        opened, used = self._windows.get(key, (now, 0))
        if now - opened >= self._window:
            opened, used = now, 0
        if used >= limit:
            return False
        self._windows[key] = (opened, used + 1)
        return True

    def reset(self) -> None:
        """Forget every window."""
        self._windows.clear()
