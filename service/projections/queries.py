"""Reads of the read models (and, for dashboards, of which batches the log moved), shaped for
the API."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from service.domain.batch import PENDING, PROCESSING, STREAM_PREFIX
from service.store.event_store import EventStore

BATCH_COLUMNS = (
    "batch_id, file_name, idempotency_key, content_sha256, total_rows, created_rows, "
    "failed_rows, deleted_rows, activated, activation_error, rollback_requested, "
    "rollback_error, rollback_refused, rolled_back, status, stream_version, created_at, "
    "updated_at, finished_at"
)
ROW_COLUMNS = (
    "row, line, name, address, phone, creation_batch_id, status, hospital_id, error_reason, "
    "error_message, attempts, reconciled"
)
BATCH_NAMES = tuple(name.strip() for name in BATCH_COLUMNS.split(","))
ROW_NAMES = tuple(name.strip() for name in ROW_COLUMNS.split(","))


def _batch(row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(BATCH_NAMES, row, strict=True))


async def get_batch(store: EventStore, batch_id: str) -> dict[str, Any] | None:
    """One batch's summary row, or None."""
    return await _batch_where(store, "batch_id", batch_id)


async def _batch_where(store: EventStore, column: str, value: str) -> dict[str, Any] | None:
    rows = await store.select(f"SELECT {BATCH_COLUMNS} FROM batches WHERE {column} = ?", (value,))
    return _batch(rows[0]) if rows else None


async def get_batches(store: EventStore, batch_ids: list[str]) -> list[dict[str, Any]]:
    """The summary rows of the batches that exist among `batch_ids`, in that order."""
    marks = ", ".join("?" * len(batch_ids))
    rows = await store.select(
        f"SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id IN ({marks})", batch_ids
    )
    found = {batch["batch_id"]: batch for batch in map(_batch, rows)}
    return [found[batch_id] for batch_id in batch_ids if batch_id in found]


async def batches_moved(
    store: EventStore, after_position: int, limit: int
) -> tuple[list[str], int, int]:
    """The batches with events among the next `limit` of the log after `after_position`, in
    the order they first moved, the last position read and how many events were read.

    Only positions and stream ids: a dashboard needs no payloads, and a page of whole events
    (each BatchCreated holds every row of its file) read and decoded by every dashboard made
    a few hundred of them slow the batches they watched twentyfold.
    """
    rows = await store.select(
        "SELECT global_position, stream_id FROM events WHERE global_position > ? "
        "ORDER BY global_position LIMIT ?",
        (after_position, limit),
    )
    if not rows:
        return [], after_position, 0
    moved = dict.fromkeys(stream.removeprefix(STREAM_PREFIX) for _, stream in rows)
    return list(moved), int(rows[-1][0]), len(rows)


async def get_batch_by_key(store: EventStore, key: str) -> dict[str, Any] | None:
    """The batch an upload with this Idempotency-Key created, or None."""
    return await _batch_where(store, "idempotency_key", key)


async def idempotency_namespace(store: EventStore) -> uuid.UUID:
    """This database's namespace for the batch ids derived from Idempotency-Keys."""
    ((namespace,),) = await store.select("SELECT idempotency_namespace FROM instance", ())
    return uuid.UUID(hex=namespace)


async def get_row_values(store: EventStore, batch_id: str) -> list[tuple[Any, ...]]:
    """Every row of a batch, in file order, as tuples in ROW_NAMES order: row_dicts makes
    them dicts, which for 50,000 rows belongs off the event loop."""
    return await store.select(
        f"SELECT {ROW_COLUMNS} FROM batch_rows WHERE batch_id = ? ORDER BY row", (batch_id,)
    )


def row_dicts(values: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Rows selected as ROW_COLUMNS, as dicts by ROW_NAMES."""
    return [dict(zip(ROW_NAMES, r, strict=True)) for r in values]


# /status `hospitals` as SQLite builds it, in its reader's thread rather than on the event loop:
# the same objects as presenters.row_result, in file order (the primary key's order).
ROW_RESULTS_JSON = (
    "SELECT json_group_array(json_object('row', row, 'hospital_id', hospital_id, "
    "'name', name, 'address', address, 'phone', phone, 'status', status, "
    "'error_message', CASE WHEN status != 'created' THEN error_message END)) "
    "FROM (SELECT * FROM batch_rows WHERE batch_id = ? ORDER BY row)"
)


STATUS_SNAPSHOT = (
    f"SELECT {BATCH_COLUMNS}, ({ROW_RESULTS_JSON}) AS hospitals FROM batches WHERE batch_id = ?"
)


async def status_snapshot(store: EventStore, batch_id: str) -> tuple[dict[str, Any], bytes] | None:
    """A batch's summary row and its /status `hospitals` array, encoded, or None. One
    statement reads both, so the counts and the rows are of the same commit."""
    found = await store.select(STATUS_SNAPSHOT, (batch_id, batch_id))
    if not found:
        return None
    *batch, hospitals = found[0]
    return _batch(tuple(batch)), str(hospitals).encode()


# A batch the service still owes work to: a fold whose `unsettled()` is true.
OWED = (
    f"(status IN ('{PENDING}', '{PROCESSING}') "
    "OR (rollback_requested = 1 AND rolled_back = 0 AND rollback_error IS NULL))"
)


async def unfinished_batch_ids(store: EventStore) -> list[str]:
    """Batches the service still owes work to, oldest first."""
    rows = await store.select(
        f"SELECT batch_id FROM batches WHERE {OWED} ORDER BY created_at, batch_id", ()
    )
    return [batch_id for (batch_id,) in rows]


async def is_unfinished(store: EventStore, batch_id: str) -> bool:
    """Whether the service still owes this batch work."""
    return bool(
        await store.select(f"SELECT 1 FROM batches WHERE batch_id = ? AND {OWED}", (batch_id,))
    )


async def list_batches(
    store: EventStore, statuses: Sequence[str], limit: int, before: tuple[str, str] | None
) -> list[dict[str, Any]]:
    """Up to limit + 1 batches (of `statuses`, or all), newest first, older than the
    `before` (created_at, id) cursor."""
    where: list[str] = []
    params: list[str] = []
    if statuses:
        where.append(f"status IN ({', '.join('?' * len(statuses))})")
        params.extend(statuses)
    if before is not None:
        where.append("(created_at, batch_id) < (?, ?)")
        params.extend(before)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = await store.select(
        f"SELECT {BATCH_COLUMNS} FROM batches {clause} "
        "ORDER BY created_at DESC, batch_id DESC LIMIT ?",
        (*params, limit + 1),
    )
    return [_batch(r) for r in rows]
