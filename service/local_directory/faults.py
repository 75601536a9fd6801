"""Scripted and random failures injected in front of the directory's endpoints."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from service.local_directory.options import ENDPOINTS

STATUS_FAULTS = ("429", "500", "502", "503", "504")
COMMIT_STATUS_FAULTS = ("commit_502", "commit_504")
FAULT_KINDS = (*STATUS_FAULTS, "reset", "hang", "commit_drop", *COMMIT_STATUS_FAULTS)
"""A status fault answers before anything is processed; `reset` closes the connection
unanswered and unprocessed; `hang` answers nothing until the client gives up (nothing is
processed); `commit_drop` processes the request (a create stores its hospital) and then
closes the connection unanswered; `commit_502` and `commit_504` process it and then answer
as the host's proxy does when the app's answer is lost on the way back."""


@dataclass
class FaultRule:
    """One injected fault: on the `nth` requests of an endpoint, at random, or always."""

    endpoint: str
    kind: str
    probability: float | None = None
    nth: frozenset[int] = frozenset()
    seed: int | None = None
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {self.endpoint!r}; use one of {ENDPOINTS}")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {FAULT_KINDS}")
        if self.probability is not None and self.nth:
            raise ValueError("give a probability or nth, not both")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be between 0 and 1")
        if any(n < 1 for n in self.nth):
            raise ValueError("nth counts requests from 1")
        self._rng = random.Random(self.seed)

    def fires(self) -> bool:
        """Count one request to the endpoint and say whether this rule strikes it."""
        self.seen += 1
        if self.nth:
            strikes = self.seen in self.nth
        elif self.probability is None:
            strikes = True
        else:
            strikes = self._rng.random() < self.probability
        self.fired += strikes
        return strikes

    def describe(self) -> dict[str, Any]:
        """The rule as JSON for the control surface."""
        return {
            "endpoint": self.endpoint,
            "kind": self.kind,
            "probability": self.probability,
            "nth": sorted(self.nth),
            "seed": self.seed,
            "seen": self.seen,
            "fired": self.fired,
        }


class FaultPlan:
    """The active fault rules; the first rule that strikes a request decides its fate."""

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []

    def add(self, rule: FaultRule) -> FaultRule:
        """Activate a rule; its `nth` counts requests from now on."""
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule."""
        self.rules.clear()

    def strike(self, endpoint: str) -> str | None:
        """The fault kind for this request to `endpoint`, if any rule strikes it."""
        # Every rule of the endpoint counts the request, so each one's nth stays exact.
        struck = [rule.kind for rule in self.rules if rule.endpoint == endpoint and rule.fires()]
        return struck[0] if struck else None
