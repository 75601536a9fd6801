"""Encoded websocket messages: built once per stream version, shared by every follower."""

from __future__ import annotations

import json

from service.web.encoded_events import EncodedEvents


def test_a_version_is_encoded_once_and_then_shared() -> None:
    encoded, builds = EncodedEvents(), []

    def build() -> dict[str, object]:
        builds.append(1)
        return {"type": "event", "version": 3}

    first = encoded.get("batch-a", 3, build)
    second = encoded.get("batch-a", 3, build)

    assert first is second
    assert json.loads(first) == {"type": "event", "version": 3}
    assert len(builds) == 1


def test_streams_and_versions_do_not_share_and_old_ones_are_dropped() -> None:
    encoded = EncodedEvents(size=2)
    encoded.get("batch-a", 1, lambda: {"v": "a1"})
    encoded.get("batch-b", 1, lambda: {"v": "b1"})
    encoded.get("batch-a", 2, lambda: {"v": "a2"})

    assert json.loads(encoded.get("batch-b", 1, lambda: {"v": "new"})) == {"v": "b1"}
    assert json.loads(encoded.get("batch-a", 1, lambda: {"v": "rebuilt"})) == {"v": "rebuilt"}
