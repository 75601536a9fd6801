"""The stand-in's mutable state and its Python control API."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from typing import Any
from uuid import UUID

from aiohttp import web

from service.local_directory.faults import FaultPlan, FaultRule
from service.local_directory.options import DirectoryOptions, rate_limit_of
from service.local_directory.rate_limit import FixedWindowLimiter
from service.local_directory.responses import DirectoryError, DirectoryRestarted
from service.local_directory.storage import Hospital, HospitalStore, NewHospital


class StandIn:
    """One local directory: its hospitals, limits and worker pool, plus test controls."""

    def __init__(self, options: DirectoryOptions) -> None:
        self.options = options
        self.create_delay = options.create_delay
        self.jitter = options.jitter
        self.store = HospitalStore(options.capacity)
        self.faults = FaultPlan()
        self.request_counts: Counter[str] = Counter()
        self._limiter = FixedWindowLimiter(options.window_seconds)
        # The directory runs its sync handlers in a 40-thread pool shared by all endpoints.
        self._workers = asyncio.Semaphore(options.handlers)
        self._jitter_rng = random.Random()
        self._cold_start: float | None = None
        self._awake_at = 0.0
        self._commits: set[asyncio.Task[Hospital]] = set()
        self._closing = asyncio.Event()
        self._generation = 0  # one more per restart

    # -- control API -------------------------------------------------------------------------

    def set_delay(self, create_delay: float, jitter: float = 0.0) -> None:
        """Make creates sleep `create_delay` plus up to `jitter` seconds before storing."""
        self.create_delay = create_delay
        self.jitter = jitter

    def cold_start(self, seconds: float) -> None:
        """Make the next request, and any arriving while it waits, wait `seconds` to be served."""
        self._cold_start = seconds

    def restart(self) -> None:
        """Lose every hospital and rate window, ids restart at 1; in-flight creates die unstored,
        and hanging requests and those waiting for a handler die unanswered with the process.

        Request counts and fault rules belong to the test, not the directory, and survive.
        """
        self._generation += 1
        for task in self._commits:
            task.cancel()
        self.store.clear()
        self._limiter.reset()

    def add_fault(
        self,
        endpoint: str,
        kind: str,
        *,
        probability: float | None = None,
        nth: int | Iterable[int] | None = None,
        seed: int | None = None,
    ) -> FaultRule:
        """Inject `kind` on `endpoint`: on the nth requests from now, at random, or always."""
        chosen = frozenset([nth] if isinstance(nth, int) else () if nth is None else nth)
        if nth is not None and not chosen:  # no request named is not every request
            raise ValueError("nth names no request; leave it out to strike every request")
        return self.faults.add(FaultRule(endpoint, kind, probability, chosen, seed))

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        self.faults.clear()

    def all_hospitals(self) -> list[dict[str, Any]]:
        """Every stored hospital as the directory returns it."""
        return [h.to_json() for h in self.store.all()]

    def hospitals_in_batch(self, batch_id: str | UUID) -> list[dict[str, Any]]:
        """The stored members of a batch (an empty list, unlike the directory's 404)."""
        return [h.to_json() for h in self.store.batch(str(UUID(str(batch_id))))]

    def duplicates(self) -> list[dict[str, Any]]:
        """Same (batch, name, address, phone) stored more than once in a batch. A file's
        identical rows show here too; a row stored under no batch or two batches does not."""
        return self.store.duplicates()

    def state(self) -> dict[str, Any]:
        """Everything a test may want to assert on, as JSON."""
        return {
            "standin": True,
            "create_delay": self.create_delay,
            "jitter": self.jitter,
            "request_counts": dict(self.request_counts),
            "hospital_count": len(self.store),
            "batches": self.store.batch_totals(),
            "duplicates": self.duplicates(),
            "faults": [rule.describe() for rule in self.faults.rules],
        }

    # -- used by the server ------------------------------------------------------------------

    def receive(self, endpoint: str) -> str | None:
        """Count a request to `endpoint` and return the fault kind it is to suffer, if any."""
        self.request_counts[endpoint] += 1
        return self.faults.strike(endpoint)

    async def wait_until_awake(self) -> None:
        """Hold a request while a simulated cold start is still booting the directory."""
        now = time.monotonic()
        if self._cold_start is not None:
            self._awake_at, self._cold_start = now + self._cold_start, None
        await self.pause(self._awake_at - now)

    async def pause(self, seconds: float) -> None:
        """Sleep, cut short when the server shuts down."""
        if seconds > 0:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), seconds)

    @property
    def closing(self) -> bool:
        """Whether the server is shutting down."""
        return self._closing.is_set()

    @property
    def generation(self) -> int:
        """How many times the directory restarted: a request from before one dies with it."""
        return self._generation

    @asynccontextmanager
    async def handling(self, endpoint: str, caller: str | None) -> AsyncIterator[None]:
        """Run a validated request on a worker slot, refusing it when over the rate limit."""
        # Validation happens before this, outside the pool and the limiter, as in FastAPI;
        # slowapi checks the limit inside the (threaded) endpoint function.
        generation = self.generation
        async with self._workers:
            if generation != self.generation:  # queued in a directory that since restarted
                raise DirectoryRestarted
            limit = rate_limit_of(endpoint)
            if self.options.rate_limit and not self._limiter.allow((endpoint, caller), limit):
                raise DirectoryError(429, {"error": f"Rate limit exceeded: {limit} per 1 minute"})
            yield

    async def commit_create(self, new: NewHospital) -> Hospital:
        """Sleep the create delay, then store; the store happens even if the caller is gone."""
        # The directory sleeps in a thread nobody cancels, so a client that timed out or
        # disconnected still gets its hospital; shield the commit from handler cancellation.
        task = asyncio.create_task(self._sleep_then_store(new))
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)
        return await asyncio.shield(task)

    async def _sleep_then_store(self, new: NewHospital) -> Hospital:
        await asyncio.sleep(self.create_delay + self._jitter_rng.uniform(0.0, self.jitter))
        return self.store.add(new)

    async def close(self) -> None:
        """Stop hanging and sleeping requests so the server can shut down promptly."""
        self._closing.set()
        for task in self._commits:
            task.cancel()
        await asyncio.gather(*self._commits, return_exceptions=True)


STANDIN_KEY = web.AppKey("standin", StandIn)
"""Where the application keeps its StandIn."""
