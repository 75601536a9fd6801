"""The directory's in-memory hospital table: global ids, FIFO eviction, batch lookups."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class NewHospital:
    """A validated create body."""

    name: str
    address: str
    phone: str | None
    creation_batch_id: str | None


@dataclass
class Hospital:
    """One stored hospital, mutable as the directory's own records are."""

    id: int
    name: str
    address: str
    phone: str | None
    creation_batch_id: str | None
    active: bool
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The Hospital object exactly as the directory serialises it."""
        return {
            "id": self.id,
            "name": self.name,
            "address": self.address,
            "phone": self.phone,
            "creation_batch_id": self.creation_batch_id,
            "active": self.active,
            # Naive UTC, like pydantic's rendering of datetime.utcnow().
            "created_at": self.created_at.isoformat(),
        }


class HospitalStore:
    """Insertion-ordered hospitals; the oldest are silently dropped beyond `capacity`."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._rows: dict[int, Hospital] = {}
        # Members of each batch by id: the cap check on every create must not scan the table.
        self._batches: dict[str, dict[int, Hospital]] = {}
        self._last_id = 0

    def add(self, new: NewHospital) -> Hospital:
        """Store a hospital under the next global id."""
        self._last_id += 1
        hospital = Hospital(
            id=self._last_id,
            name=new.name,
            address=new.address,
            phone=new.phone,
            creation_batch_id=new.creation_batch_id,
            # The directory activates batchless hospitals at once and batch members on PATCH.
            active=new.creation_batch_id is None,
            created_at=datetime.now(UTC).replace(tzinfo=None),
        )
        self._rows[hospital.id] = hospital
        if hospital.creation_batch_id is not None:
            self._batches.setdefault(hospital.creation_batch_id, {})[hospital.id] = hospital
        while len(self._rows) > self._capacity:
            self.delete(next(iter(self._rows)))
        return hospital

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, hospital_id: int) -> Hospital | None:
        """The hospital with this id, if still stored."""
        return self._rows.get(hospital_id)

    def delete(self, hospital_id: int) -> bool:
        """Remove one hospital; False when it was not stored."""
        hospital = self._rows.pop(hospital_id, None)
        if hospital is None:
            return False
        if hospital.creation_batch_id is not None:
            members = self._batches[hospital.creation_batch_id]
            del members[hospital_id]
            if not members:
                del self._batches[hospital.creation_batch_id]
        return True

    def all(self) -> list[Hospital]:
        """Every stored hospital, oldest first."""
        return list(self._rows.values())

    def batch(self, batch_id: str) -> list[Hospital]:
        """The stored members of a batch, oldest first."""
        return list(self._batches.get(batch_id, {}).values())

    def delete_batch(self, batch_id: str) -> int:
        """Remove every member of a batch and return how many there were."""
        members = self.batch(batch_id)
        for hospital in members:
            self.delete(hospital.id)
        return len(members)

    def batch_totals(self) -> dict[str, int]:
        """Stored hospitals per batch id (batchless hospitals are left out)."""
        return {batch_id: len(members) for batch_id, members in self._batches.items()}

    def duplicates(self) -> list[dict[str, Any]]:
        """Groups of batch members sharing batch, name, address and phone, with their count."""
        groups = Counter(
            (h.creation_batch_id, h.name, h.address, h.phone)
            for h in self._rows.values()
            if h.creation_batch_id is not None
        )
        return [
            {
                "creation_batch_id": batch,
                "name": name,
                "address": address,
                "phone": phone,
                "count": count,
            }
            for (batch, name, address, phone), count in groups.items()
            if count > 1
        ]

    def clear(self) -> None:
        """Forget everything, ids included, as a directory restart does."""
        self._rows.clear()
        self._batches.clear()
        self._last_id = 0
