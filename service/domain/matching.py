"""Telling which of the directory's hospitals are a batch's rows: pure, no I/O."""

from __future__ import annotations

from typing import Any, NamedTuple


class HospitalRecord(NamedTuple):
    """What the directory keeps of one hospital, in the fields a row can be matched on.

    The id alone would not do: a directory that restarted gives the same ids again, to
    other hospitals (identical rows among them). created_at is None for a row recorded
    before it was kept.
    """

    id: Any  # an int as the directory answers it (None in a row not yet created)
    created_at: str | None
    name: str | None
    address: str | None
    phone: str | None

    @classmethod
    def of(cls, hospital: dict[str, Any]) -> HospitalRecord:
        """The record of one hospital as the directory answers it."""
        return cls(
            hospital.get("id"),
            hospital.get("created_at"),
            hospital.get("name"),
            hospital.get("address"),
            hospital.get("phone"),
        )

    @property
    def values(self) -> tuple[str | None, str | None, str | None]:
        """Name, address and phone: what a row holds before it is created."""
        return self.name, self.address, self.phone

    def holds(self, hospital: HospitalRecord) -> bool:
        """Whether the directory's `hospital` is this row's record."""
        if self.created_at is None:
            return self._replace(created_at=None) == hospital._replace(created_at=None)
        return self == hospital


def pair(
    rows: list[HospitalRecord], hospitals: list[dict[str, Any]]
) -> tuple[list[dict[str, Any] | None], list[dict[str, Any]]]:
    """Each row's record among the directory's `hospitals` (None when it holds none), each
    hospital standing for one row at most; and the hospitals no row holds, in their order."""
    left = [(HospitalRecord.of(h), h) for h in hospitals]
    found: list[dict[str, Any] | None] = []
    for mine in rows:
        at = next((i for i, (theirs, _) in enumerate(left) if mine.holds(theirs)), None)
        found.append(None if at is None else left.pop(at)[1])
    return found, [h for _, h in left]
