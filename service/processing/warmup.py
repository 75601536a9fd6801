"""Waking a directory that sleeps when idle, before the creates that would time out on it."""

from __future__ import annotations

import asyncio
import logging

from service.processing.directory_client import DirectoryClient
from service.settings import DirectorySettings

log = logging.getLogger(__name__)


class WarmUp:
    """One long GET / after `directory.idle_seconds` without a call, shared by every worker.

    While the directory does not answer, every row's every attempt warms it up again: the
    operator hears of that once, and once more when it answers again.
    """

    def __init__(self, client: DirectoryClient, settings: DirectorySettings) -> None:
        self._client, self._settings = client, settings
        self._lock = asyncio.Lock()
        self._unanswered = False  # the last warm-up got no answer; said once, until one comes

    async def ensure_awake(self) -> None:
        """Return once the directory was called lately or a warm-up has had its answer."""
        if self._client.idle_for() < self._settings.idle_seconds:
            if self._unanswered:
                self._answers_again()
            return
        if self._lock.locked():  # one is under way: its outcome stands for this row too
            async with self._lock:
                return
        async with self._lock:
            answer = await self._client.warm_up()
            if answer.status is not None:
                if self._unanswered:
                    self._answers_again()
            elif not self._unanswered:
                self._unanswered = True
                log.warning(
                    "the directory at %s (directory.base_url) did not answer its warm-up: %s; "
                    "creates are sent all the same, each row tried up to "
                    "directory.max_attempts (%d) times; not said again until it answers",
                    self._client.base_url,
                    answer.message,
                    self._settings.max_attempts,
                )

    def _answers_again(self) -> None:
        self._unanswered = False
        log.info("the directory at %s answers again", self._client.base_url)
