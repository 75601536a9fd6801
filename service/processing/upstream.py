"""Whole upstream batches: activating and deleting them, each call repeated only when safe."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, NamedTuple

from service.domain import batch as b
from service.domain import events as ev
from service.domain.matching import pair
from service.processing.directory_client import Answer, DirectoryClient, Outcome
from service.processing.pacing import Pauses, WindowPacer, backoff
from service.settings import DirectorySettings


class Activation(NamedTuple):
    """How activating one upstream batch went: its hospitals active, or why not."""

    ok: bool
    activated: int = 0
    error: str = ""
    lost: bool = False  # hospitals of it are missing: no activation can complete it


# What to do about rows the log reads as created but the directory lost: only new creates
# can bring them back.
RELOAD = "roll the batch back, then upload the file again"


class UpstreamBatches:
    """Calls on whole upstream batches; each method answers with the fact to record."""

    def __init__(
        self, client: DirectoryClient, settings: DirectorySettings, pauses: Pauses
    ) -> None:
        self._client, self._settings, self._pauses = client, settings, pauses
        # A start after a lost log looks at every unfinished upstream batch at once, and many
        # batches rolled back (or finished) together delete (or activate) theirs at once:
        # calls past the limit would each spend a try on a 429. The directory counts each
        # endpoint apart, 50 a window each.
        self._reads, self._activations, self._deletes = (
            WindowPacer(
                settings.batch_calls_per_minute,
                settings.rate_window_seconds,
                settings.rate_window_margin,
            )
            for _ in range(3)
        )

    async def _patiently(
        self, call: Callable[[], Awaitable[Answer]], repeat_ambiguous: bool = True
    ) -> Answer:
        """Repeat a call while it provably was not processed, and, for a read or a delete,
        while its answer was lost: a rate limit waits out the window, the rest back off."""
        retryable = {Outcome.NOT_SENT, Outcome.RATE_LIMITED}
        if repeat_ambiguous:
            retryable.add(Outcome.AMBIGUOUS)
        answer = await call()
        for attempt in range(1, self._settings.max_attempts):
            if answer.outcome not in retryable:
                break
            wait = backoff(attempt, self._settings.backoff_base, self._settings.backoff_max)
            if answer.outcome is Outcome.RATE_LIMITED:
                wait = self._settings.rate_window_seconds
            await self._pauses.sleep(wait)
            answer = await call()
        return answer

    def _paced(
        self, pacer: WindowPacer, call: Callable[[], Awaitable[Answer]]
    ) -> Callable[[], Awaitable[Answer]]:
        """`call`, sent once `pacer`'s window has room; after a 429 (others' calls share the
        window) every later call waits it out."""

        async def paced() -> Answer:
            with self._pauses.held():
                counted_at = await pacer.acquire()
            answer = await call()
            if answer.outcome is Outcome.RATE_LIMITED:
                pacer.refused()
            elif answer.outcome is Outcome.NOT_SENT:  # the directory saw nothing to count
                pacer.unused(counted_at)
            return answer

        return paced

    async def members(self, creation_batch_id: str) -> Answer:
        """An upstream batch's records, read again while unsent, rate-limited or unclear."""
        read = functools.partial(self._client.batch_members, creation_batch_id)
        return await self._patiently(self._paced(self._reads, read))

    async def activate(self, state: b.BatchState) -> ev.BatchActivated | ev.BatchActivationFailed:
        """Activate every upstream batch; after an unclear answer, look, and ask again only
        while none of its hospitals is active (activation is not idempotent).

        The upstream batch of the row the directory stored first is looked at, then
        activated alone: a directory restart since that create wiped the row, and its FIFO
        drops that row before any other, so the batch fails before anything of it is active.
        The others then go as many at a time as there are workers.
        """
        first = _stored_first(state)
        lead = next(u for u in state.upstream if first in u.rows)
        rest = [u for u in state.upstream if u is not lead]
        members = await self.members(lead.creation_batch_id)
        if not members.ok:
            why = f"could not look at upstream batch {lead.creation_batch_id} before activating"
            return ev.BatchActivationFailed(f"{why} it: {members.message}")
        present, active = _found(state, lead, members.body)
        if present < len(lead.rows):
            missing = _missing(lead, present, "nothing was activated")
            return ev.BatchActivationFailed(f"{missing}; {RELOAD}")
        tried = [lead]
        # The lead all active already: an earlier round activated it (before a crash could
        # record it, or before it failed on another upstream batch), and may have activated
        # others that no record names, so each of the others is read back before its PATCH.
        if earlier := active == len(lead.rows):  # no PATCH: a second one is refused (400)
            results = [Activation(True, active)]
        else:
            results = [await self._activate_one(state, lead)]
        if results[0].ok:
            slots = asyncio.Semaphore(self._settings.concurrency)

            async def activate(upstream: ev.UpstreamBatch) -> Activation:
                async with slots:
                    return await self._activate_one(state, upstream, look_first=earlier)

            # A task group: if one slice raises, the others end before a new attempt starts.
            async with asyncio.TaskGroup() as group:
                slices = [group.create_task(activate(u)) for u in rest]
            results += [task.result() for task in slices]
            tried += rest
        if failures := [result for result in results if not result.ok]:
            more = f" (and {len(failures) - 1} more upstream batches)" if len(failures) > 1 else ""
            reload = f"; {RELOAD}" if any(result.lost for result in failures) else ""
            took = tuple(u.creation_batch_id for u, r in zip(tried, results, strict=True) if r.ok)
            return ev.BatchActivationFailed(failures[0].error + more + reload, took)
        ids = tuple(u.creation_batch_id for u in state.upstream)
        return ev.BatchActivated(sum(result.activated for result in results), ids)

    async def _activate_one(
        self, state: b.BatchState, upstream: ev.UpstreamBatch, look_first: bool = False
    ) -> Activation:
        batch_id, total = upstream.creation_batch_id, len(upstream.rows)
        # Activated in a round that failed on another upstream batch (or, with `look_first`,
        # maybe in one that a crash cut off): a second PATCH is refused (400) and counts
        # against the limit. Its records tell, unless none of them is active (not activated
        # yet, or a directory restart since): then it is activated.
        if look_first or batch_id in state.activated_upstream:
            seen = await self._seen_active(state, upstream, "activated before")
            if seen is not None:
                return seen
        answer = None
        settings = self._settings
        activate = self._paced(
            self._activations, functools.partial(self._client.activate, batch_id)
        )
        for attempt in range(1, settings.max_attempts + 1):
            if state.rollback_requested:  # the fold is live: asked for while this one ran
                return Activation(False, error="a rollback was asked for; not activated")
            # Activation is not idempotent: it is repeated only while provably not done.
            answer = await self._patiently(activate, repeat_ambiguous=False)
            count = answer.body.get("activated_count") if isinstance(answer.body, dict) else None
            if answer.ok and count == total:
                return Activation(True, total)
            if answer.outcome in (Outcome.RATE_LIMITED, Outcome.NOT_SENT):
                break  # refused or not sent on each of `_patiently`'s tries: the budget is spent
            # A 400 (some already active), a timeout, a 5xx or an odd count: the batch tells.
            said = f"activation answered: {answer.message}"
            if (seen := await self._seen_active(state, upstream, said)) is not None:
                return seen
            # None of ours is active: the activation did not happen, so asking again is safe,
            # after a pause, as what failed at once (a proxy's 503) may fail again at once.
            if attempt < settings.max_attempts:
                await self._pauses.sleep(
                    backoff(attempt, settings.backoff_base, settings.backoff_max)
                )
        if answer is None:
            message = "no answer"
        elif answer.ok:  # its own words would read "ok"
            message = f"it answered {answer.status}, yet none of its hospitals is active"
        else:
            message = answer.message
        return Activation(
            False, error=f"activation of upstream batch {batch_id} did not take effect: {message}"
        )

    async def _seen_active(
        self, state: b.BatchState, upstream: ev.UpstreamBatch, said: str
    ) -> Activation | None:
        """What the upstream batch's records say of its activation (`said`: what is known
        of it so far); None when none of its hospitals is active, so activating is safe."""
        batch_id, total = upstream.creation_batch_id, len(upstream.rows)
        members = await self.members(batch_id)
        if not members.ok:
            why = f"could not confirm activation of upstream batch {batch_id}: "
            return Activation(False, error=why + members.message)
        present, active = _found(state, upstream, members.body)
        if active == total:
            return Activation(True, total)
        if present < total:
            return Activation(False, error=_missing(upstream, present, said), lost=True)
        if active:
            return Activation(
                False,
                error=f"upstream batch {batch_id} is only partly active ({active} of {total}) "
                f"and cannot be activated again: {said}",
            )
        return None

    async def delete(self, state: b.BatchState) -> ev.BatchRolledBack | ev.BatchRollbackFailed:
        """Delete every upstream batch; a 404 means its hospitals are already gone.

        A delete still refused after `_patiently`'s tries ends the round with a failure,
        not a new round at once: the user asks again when the cause is gone.
        """
        deleted, gone = 0, []
        for upstream in state.upstream:
            batch_id = upstream.creation_batch_id
            delete = functools.partial(self._client.delete_batch, batch_id)
            answer = await self._patiently(self._paced(self._deletes, delete))
            if answer.ok or answer.outcome is Outcome.NOT_FOUND:
                count = answer.body.get("deleted_count") if isinstance(answer.body, dict) else 0
                deleted += count if isinstance(count, int) else 0
                gone.append(batch_id)
            else:
                reason = f"the directory did not delete upstream batch {batch_id}: {answer.message}"
                return ev.BatchRollbackFailed(reason, tuple(gone))
        return ev.BatchRolledBack(deleted, tuple(gone))


def _stored_first(state: b.BatchState) -> int | None:
    """The row whose hospital the directory stored first, by its record's created_at.

    Not the row recorded first: after a crash or a lost answer, rows of another upstream
    batch are created and recorded before older ones are found by a check. The directory
    loses its oldest hospitals first (FIFO), and all of them on a restart, so the upstream
    batch of the oldest one is where a loss shows first.
    """
    rows = state.rows.items()
    try:
        _, first = min((datetime.fromisoformat(r.created_at or ""), n) for n, r in rows)
    except (ValueError, TypeError):  # a record without created_at, or unlike the others
        return state.first_created
    return first


def _found(
    state: b.BatchState, upstream: ev.UpstreamBatch, records: list[dict[str, Any]]
) -> tuple[int, int]:
    """How many rows of `upstream` the directory's records hold, and how many are active."""
    found, _ = pair([state.rows[n].record for n in upstream.rows], records)
    active = [bool(record.get("active")) for record in found if record is not None]
    return len(active), sum(active)


def _missing(upstream: ev.UpstreamBatch, present: int, then: str) -> str:
    total = len(upstream.rows)
    return (
        f"{total - present} of the {total} hospitals of upstream batch "
        f"{upstream.creation_batch_id} are missing from the directory (was it restarted?); {then}"
    )
