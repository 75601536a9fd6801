"""Settings of the local stand-in and the fixed facts of the directory it imitates."""

from __future__ import annotations

from dataclasses import dataclass

BATCH_CAP = 20
"""A batch refuses new members once it holds this many stored hospitals."""

ENDPOINTS = (
    "root",
    "create",
    "list",
    "get",
    "update",
    "delete",
    "batch_get",
    "batch_activate",
    "batch_delete",
)
"""Stable keys of the directory's routes, used for request counts, faults and rate limits."""

CONTROL_PREFIX = "/_standin/"
"""Paths of the stand-in's own control surface, which the real directory does not have."""

_RATE_LIMITS = {"create": 30, "root": 100}
_DEFAULT_RATE_LIMIT = 50


def rate_limit_of(endpoint: str) -> int:
    """Requests per window the directory allows one caller on `endpoint`."""
    return _RATE_LIMITS.get(endpoint, _DEFAULT_RATE_LIMIT)


@dataclass(frozen=True)
class DirectoryOptions:
    """How the stand-in behaves. The defaults are the real directory's delay and limits, with
    no jitter (the real one takes 5.3-7.5 s a create), so that timings repeat."""

    create_delay: float = 5.0
    jitter: float = 0.0
    rate_limit: bool = True
    handlers: int = 40
    control: bool = False
    window_seconds: float = 60.0
    capacity: int = 10_000
