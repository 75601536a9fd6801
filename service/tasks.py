"""Background tasks that must not fail silently."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


def log_failure(task: asyncio.Task[None]) -> None:
    """A done-callback: say why a background task stopped on an error, as it stops; /health
    only shows that it is gone."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("%s stopped on an error", task.get_name(), exc_info=error)
