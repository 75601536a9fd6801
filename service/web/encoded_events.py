"""`event` websocket messages, encoded once and sent to every follower of the stream."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class EncodedEvents:
    """The recent messages by (stream, version).

    A stream's event at a version never changes, and neither does the fold after it, so
    the message is the same for every follower: the first one to reach it encodes it.
    """

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._messages: OrderedDict[tuple[str, int], str] = OrderedDict()

    def get(self, stream_id: str, version: int, build: Callable[[], dict[str, Any]]) -> str:
        """The encoded message, built and kept on first use."""
        key = (stream_id, version)
        text = self._messages.get(key)
        if text is None:
            text = self._messages[key] = json.dumps(build())
            if len(self._messages) > self.size:
                self._messages.popitem(last=False)
        return text
