"""Figures of a benchmark run: each with its target, printed as a table and as JSON lines."""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Target:
    op: str
    limit: float

    def met(self, value: float) -> bool:
        return not math.isnan(value) and _COMPARE[self.op](value, self.limit)

    def __str__(self) -> str:
        return f"{self.op} {_number(self.limit)}"


def at_most(limit: float) -> Target:
    return Target("<=", limit)


def at_least(limit: float) -> Target:
    return Target(">=", limit)


def exactly(limit: float) -> Target:
    return Target("==", limit)


@dataclass(frozen=True)
class Figure:
    """One measured number; `target` None means reported for context only."""

    scenario: str
    name: str  # stable key for BENCH_JSON, e.g. "latency_bound.wall_over_floor"
    label: str  # what the table shows
    value: float | None
    unit: str
    target: Target | None = None
    load: float | None = None  # 1-minute load average when it was measured

    @property
    def ok(self) -> bool | None:
        """Whether the target is met; None without a target or without a value."""
        if self.target is None or self.value is None:
            return None
        return self.target.met(self.value)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            # A plain number, for a program to read: the table's `50,000` is for people.
            "target": None if self.target is None else f"{self.target.op} {self.target.limit!r}",
            "ok": self.ok,
        }


class Report:
    """The figures of one run, in the order they were measured."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []

    def add(
        self,
        scenario: str,
        name: str,
        label: str,
        value: float | None,
        unit: str = "",
        target: Target | None = None,
    ) -> Figure:
        """Record a figure with the load average of this moment."""
        figure = Figure(scenario, name, label, value, unit, target, os.getloadavg()[0])
        self.figures.append(figure)
        return figure

    def value(self, name: str) -> float | None:
        """The value of an earlier figure, None when it was not measured."""
        return next((f.value for f in self.figures if f.name == name), None)

    def missed(self, scenario: str) -> list[Figure]:
        """The figures of a scenario that missed their target."""
        return [f for f in self.figures if f.scenario == scenario and f.ok is False]


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):  # a count
        return f"{value:,}"
    if value == int(value) and abs(value) >= 100:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def table(figures: Sequence[Figure]) -> str:
    """A Markdown table, ready to paste into the README."""
    lines = [
        "| scenario | figure | value | target | ok | load |",
        "|---|---|---:|---|---|---:|",
    ]
    for f in figures:
        value = f"{_number(f.value)} {f.unit}".strip()
        target = "" if f.target is None else f"{f.target} {f.unit}".strip()
        ok = {None: "", True: "yes", False: "**MISSED**"}[f.ok]
        load = "" if f.load is None else f"{f.load:.2f}"
        lines.append(f"| {f.scenario} | {f.label} | {value} | {target} | {ok} | {load} |")
    return "\n".join(lines)


def write_json(figures: Sequence[Figure], path: Path) -> None:
    """One JSON object per line: name, value, unit, target, ok."""
    with path.open("w", encoding="utf-8") as out:
        for f in figures:
            out.write(json.dumps(f.to_json()) + "\n")
