"""WindowPacer on virtual time, and the retry backoff."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import TypeVar

import pytest

from service.processing import pacing
from service.processing.pacing import Lookahead, WindowPacer, backoff

T = TypeVar("T")
PER_WINDOW, WINDOW, MARGIN = 30, 60.0, 0.5
NEXT = WINDOW + MARGIN  # when the pacer's second window opens


class VirtualTime:
    """A clock that moves only when every task sleeps, straight to the earliest wake-up."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._wakeups: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        woken = asyncio.get_running_loop().create_future()
        heapq.heappush(self._wakeups, (self.now + delay, next(self._order), woken))
        await woken

    async def run(self, *calls: Awaitable[T]) -> list[T]:
        """Run the calls concurrently to their end, jumping over every sleep."""
        tasks = [asyncio.ensure_future(call) for call in calls]
        for _ in range(10_000):
            for _ in range(3):  # let every woken task run until it sleeps again or ends
                await asyncio.sleep(0)
            if all(task.done() for task in tasks):
                return [task.result() for task in tasks]
            assert self._wakeups, "tasks wait for something other than time"
            when, _, woken = heapq.heappop(self._wakeups)
            self.now = max(self.now, when)
            woken.set_result(None)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pytest.fail(f"still waiting at {self.now:g} s after 10,000 sleeps")


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> VirtualTime:
    time = VirtualTime()
    # Only the pacer's sleeps are virtual; the event loop and VirtualTime.run keep the real one.
    monkeypatch.setattr(pacing, "asyncio", SimpleNamespace(sleep=time.sleep))
    return time


@pytest.fixture
def pacer(clock: VirtualTime) -> WindowPacer:
    return WindowPacer(PER_WINDOW, WINDOW, MARGIN, clock=clock)


async def grant(pacer: WindowPacer, clock: VirtualTime) -> float:
    await pacer.acquire()
    return clock.now


async def grants_in_turn(pacer: WindowPacer, clock: VirtualTime, count: int) -> list[float]:
    """Acquire `count` times one after the other; the time of each grant."""

    async def in_turn() -> list[float]:
        return [await grant(pacer, clock) for _ in range(count)]

    (times,) = await clock.run(in_turn())
    return times


async def grants_at(pacer: WindowPacer, clock: VirtualTime, at: float, count: int) -> list[float]:
    """Move the clock to `at`, then acquire `count` times one after the other."""
    clock.now = at
    return await grants_in_turn(pacer, clock, count)


def directory_counts(times: list[float]) -> list[int]:
    """Sends per window, counted as the directory counts: each opens at its first request."""
    counts: list[int] = []
    start = -float("inf")
    for t in sorted(times):
        if t >= start + WINDOW:
            start = t
            counts.append(0)
        counts[-1] += 1
    return counts


async def test_a_full_window_goes_out_at_once(pacer: WindowPacer, clock: VirtualTime) -> None:
    times = await grants_in_turn(pacer, clock, PER_WINDOW)

    assert times == [0.0] * PER_WINDOW
    assert clock.sleeps == []


async def test_room_is_seen_until_the_window_is_full_and_again_once_it_ends(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    seen = [pacer.has_room()]
    await grants_in_turn(pacer, clock, PER_WINDOW)
    seen.append(pacer.has_room())
    clock.now += NEXT
    seen.append(pacer.has_room())

    assert seen == [True, False, True]


async def test_one_more_waits_for_the_window_and_margin(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    clock.now = 100.0

    times = await grants_in_turn(pacer, clock, PER_WINDOW + 1)

    assert times[-2:] == [100.0, 100.0 + NEXT]


async def test_the_window_starts_at_the_first_grant_not_at_creation(clock: VirtualTime) -> None:
    pacer = WindowPacer(PER_WINDOW, WINDOW, MARGIN, clock=clock)
    clock.now = 5.0
    await grants_in_turn(pacer, clock, 1)
    clock.now = 20.0

    times = await grants_in_turn(pacer, clock, PER_WINDOW)

    assert times[-1] == 5.0 + NEXT


async def test_a_new_window_starts_afresh(pacer: WindowPacer, clock: VirtualTime) -> None:
    times = await grants_in_turn(pacer, clock, 2 * PER_WINDOW + 1)

    assert times[PER_WINDOW:] == [NEXT] * PER_WINDOW + [2 * NEXT]


async def test_after_an_idle_spell_a_full_window_goes_out_at_once(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    await grants_in_turn(pacer, clock, PER_WINDOW)
    clock.now = 500.0

    times = await grants_in_turn(pacer, clock, PER_WINDOW)

    assert times == [500.0] * PER_WINDOW


async def test_a_refusal_blocks_everything_for_a_whole_window_from_now(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    await grants_in_turn(pacer, clock, 5)  # the window still has room for 25
    clock.now = 10.0
    pacer.refused()

    times = await grants_in_turn(pacer, clock, PER_WINDOW + 1)

    # Then a fresh window: a full burst, and the next one a window and margin later.
    assert times == [10.0 + NEXT] * PER_WINDOW + [10.0 + 2 * NEXT]


async def test_pacing_is_off_when_per_window_is_zero(clock: VirtualTime) -> None:
    pacer = WindowPacer(0, WINDOW, MARGIN, clock=clock)

    times = await grants_in_turn(pacer, clock, 1000)

    assert set(times) == {0.0}
    assert clock.sleeps == []


async def test_a_refusal_holds_creates_back_a_window_with_pacing_off_too(
    clock: VirtualTime,
) -> None:
    # Else a rate-limited row went straight back to the directory, 429 after 429: thousands
    # of retries a minute in the log.
    pacer = WindowPacer(0, WINDOW, MARGIN, clock=clock)
    clock.now = 10.0
    pacer.refused()
    assert not pacer.has_room()

    times = await grants_in_turn(pacer, clock, 100)

    assert set(times) == {10.0 + NEXT}  # then unpaced again


async def test_concurrent_acquirers_never_overfill_a_window(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    times = await clock.run(*(grant(pacer, clock) for _ in range(100)))

    assert directory_counts(times) == [30, 30, 30, 10]
    assert sorted(set(times)) == [0.0, NEXT, 2 * NEXT, 3 * NEXT]


async def test_a_refusal_holds_back_acquirers_already_waiting(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    async def refuse_at(when: float) -> None:
        await clock.sleep(when)
        pacer.refused()

    results = await clock.run(refuse_at(30.0), *(grant(pacer, clock) for _ in range(60)))

    times = [t for t in results if t is not None]
    assert sorted(set(times)) == [0.0, 30.0 + NEXT]
    assert directory_counts(times) == [30, 30]


# backoff --------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_stays_within_its_bound(attempt: int) -> None:
    bound = min(30.0, 0.5 * 2 ** (attempt - 1))

    delays = [backoff(attempt, base=0.5, cap=30.0) for _ in range(200)]

    assert all(0.0 <= d <= bound for d in delays)
    assert len(set(delays)) > 1  # jittered, not a fixed delay


def test_backoff_bound_doubles_with_each_attempt_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)

    bounds = [backoff(attempt, base=1.0, cap=30.0) for attempt in range(1, 9)]

    assert bounds == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_may_be_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: low)

    assert backoff(3, base=1.0, cap=30.0) == 0.0


async def test_room_waits_for_the_next_window_without_taking_a_place(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    clock.now = 100.0

    async def room_at() -> float:
        await pacer.room()
        return clock.now

    assert await clock.run(room_at(), room_at()) == [100.0, 100.0]  # room() counts nothing
    assert await grants_in_turn(pacer, clock, PER_WINDOW) == [100.0] * PER_WINDOW
    (opened,) = await clock.run(room_at())
    assert opened == 100.0 + NEXT
    assert await grants_in_turn(pacer, clock, PER_WINDOW) == [100.0 + NEXT] * PER_WINDOW


def test_lookahead_is_one_row_until_a_create_has_answered() -> None:
    assert Lookahead(most=3, budget=0.05).depth() == 1


@pytest.mark.parametrize(
    ("create_seconds", "depth"),
    [(0.005, 3), (0.02, 2), (0.03, 1), (0.2, 1), (5.0, 1)],
)
def test_lookahead_keeps_a_later_batch_waiting_less_than_its_budget(
    create_seconds: float, depth: int
) -> None:
    ahead = Lookahead(most=3, budget=0.05)
    ahead.created(create_seconds)

    assert ahead.depth() == depth


def test_lookahead_comes_down_as_creates_slow_down() -> None:
    ahead = Lookahead(most=3, budget=0.05, weight=0.5)
    ahead.created(0.005)
    depths = [ahead.depth()]
    for _ in range(2):
        ahead.created(0.04)
        depths.append(ahead.depth())

    assert depths == [3, 2, 1]


def test_lookahead_never_goes_beyond_its_most() -> None:
    ahead = Lookahead(most=1, budget=10.0)
    ahead.created(0.001)

    assert ahead.depth() == 1


async def test_creates_replayed_from_before_a_restart_use_up_their_window(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    clock.now = 100.0
    # A window opened at 10 by 10 creates, then one opened at 80 by 25: 5 places are left.
    pacer.replay([10.0] * 10 + [80.0] * 25)

    times = await grants_in_turn(pacer, clock, 6)

    assert times == [100.0] * 5 + [80.0 + NEXT]


async def test_each_replayed_create_holds_its_place_a_window_after_its_answer(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    # 35 creates answered within 5 s, so sent across two of the directory's windows, where
    # each began unknown: each place is free again a window and margin after its answer.
    pacer.replay([0.0] * 20 + [5.0] * 15)
    clock.now = 10.0

    times = await grants_in_turn(pacer, clock, 16)

    assert times == [NEXT] * 15 + [5.0 + NEXT]


async def test_the_wait_said_for_replayed_creates_is_the_wait_there_is(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    # 35 creates in one window and margin: room comes once the 30th newest ages out, not
    # the oldest. /progress says how long the window holds creates back: it must not
    # promise room 5 s before there is any.
    pacer.replay([0.0] * 5 + [5.0] * 30)
    clock.now = 10.0

    said = pacer.seconds_to_room()
    (granted,) = await grants_in_turn(pacer, clock, 1)

    assert said == granted - 10.0 == 5.0 + NEXT - 10.0


async def test_creates_replayed_from_a_window_long_over_leave_a_whole_one(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    clock.now = 100.0
    pacer.replay([10.0] * PER_WINDOW)

    assert await grants_in_turn(pacer, clock, PER_WINDOW) == [100.0] * PER_WINDOW


async def test_a_20_row_file_goes_out_whole_into_a_window_the_directory_opens_afresh(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    # A create at 0 opens the directory's window, a 20-row file goes out at 50 into it (21
    # there), and at 61 another 20-row file comes, in a window that opens with it: all 20
    # places are free there. A pacer that freed each place a window after its own create
    # (a sliding window) held 10 of them until 110.5: a window lost.
    await grants_at(pacer, clock, 0.0, 1)
    before = await grants_at(pacer, clock, 50.0, 20)

    times = await grants_at(pacer, clock, 61.0, 20)

    assert times == [61.0] * 20
    assert directory_counts([0.0, *before, *times]) == [21, 20]


async def test_a_65_row_file_takes_three_windows_after_an_earlier_create_too(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    # One create at 0, then a 65-row file at 50: 29 fit in the window opened at 0, 30 in the
    # next, 6 in the one after. A sliding window sent the last 5 at 171 (1 at 60.5, 29 at
    # 110.5, 1 at 121, 5 at 171): a window later.
    await grants_at(pacer, clock, 0.0, 1)

    times = await grants_at(pacer, clock, 50.0, 65)

    assert times[-1] == 2 * NEXT
    assert directory_counts([0.0, *times]) == [30, 30, 6]


async def test_a_replay_that_begins_inside_a_window_keeps_to_the_directory_s_windows(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    # Each window took 20 creates, then 10 more 5 s later (20 workers, 5 s a create). A
    # restart at 184 replays two windows' worth of the log, which begins after the first 20
    # creates of the window at 60.5. Rebuilding the directory's windows from it put the
    # last one at 126, full, and sent a whole window at 186.5 into the one the directory
    # had opened at 181.5 with 10 places left.
    sent = [start + lag for start in (0.0, NEXT, 2 * NEXT) for lag in [0.0] * 20 + [5.0] * 10]
    sent += [3 * NEXT] * 20
    clock.now = 3 * NEXT + 2.5
    pacer.replay([at for at in sent if at > clock.now - 2 * NEXT])

    times = await grants_in_turn(pacer, clock, 11)

    assert times == [3 * NEXT + 5.0] * 10 + [4 * NEXT]
    assert directory_counts(sent + times) == [30, 30, 30, 30, 1]


async def test_after_a_window_with_no_create_the_replay_is_over(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    # Until then each place comes back a window after its own create; from then on a window
    # is opened by a create, as the directory's are, and a file that comes as one opens
    # goes out whole.
    pacer.replay([90.0] * 20)
    first = await grants_at(pacer, clock, 100.0, 11)
    quiet = first[-1] + NEXT + 1.0
    await grants_at(pacer, clock, quiet, 1)
    await grants_at(pacer, clock, quiet + 50.0, 20)

    times = await grants_at(pacer, clock, quiet + 61.0, 20)

    assert first == [100.0] * 10 + [90.0 + NEXT]
    assert times == [quiet + 61.0] * 20


async def test_a_replay_holds_nothing_back_past_the_directory_s_windows(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    # Sent: 1 at 0, 29 at 50, 30 at 60.5 as the next window opened, each answered 3 s later;
    # a restart at 70. Moving answers past a window's worth a window later held 29 of the
    # next 30 until 174, though the directory's window ended at 120.5.
    sent = [0.0] + [50.0] * 29 + [NEXT] * 30
    clock.now = 70.0
    pacer.replay([at + 3.0 for at in sent])

    times = await grants_in_turn(pacer, clock, 30)

    assert times == [NEXT + 3.0 + NEXT] * 30
    assert directory_counts(sent + times) == [30, 30, 30]


async def test_a_stop_cancels_the_tasks_in_a_wait_and_no_other() -> None:
    pauses = pacing.Pauses()
    between = asyncio.Event()

    async def working() -> str:
        await between.wait()  # not a wait of `pauses`: a call in flight, say
        return "answered"

    waiting = asyncio.create_task(pauses.sleep(60))
    calling = asyncio.create_task(working())
    await asyncio.sleep(0)
    pauses.stop()
    between.set()

    assert await calling == "answered"
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 1)


async def test_once_stopped_no_wait_begins() -> None:
    pauses = pacing.Pauses()
    pauses.stop()
    began = False

    async def wait_then_call() -> None:
        nonlocal began
        with pauses.held():
            began = True

    task = asyncio.create_task(wait_then_call())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled() and not began


async def test_a_call_that_never_reached_the_directory_gives_its_place_back(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    # The directory down: each refused connection counted a place, so a 45-row batch sent
    # its retries 30 a minute for 7 minutes. It saw none of them: none takes a place.
    clock.now = 10.0
    for _ in range(PER_WINDOW):
        pacer.unused(await pacer.acquire())

    times = await grants_in_turn(pacer, clock, PER_WINDOW + 1)

    assert times == [10.0] * PER_WINDOW + [10.0 + NEXT]


async def test_a_window_opened_by_an_unsent_call_opens_at_the_first_sent_one(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    # The directory's window opens at the first request it sees: had the unsent call at 0
    # kept its window open, the calls from 61 on would land in the directory's window of 50.
    unsent = await pacer.acquire()
    clock.now = 50.0
    await grants_in_turn(pacer, clock, 1)
    pacer.unused(unsent)

    times = await grants_at(pacer, clock, 61.0, PER_WINDOW)

    assert directory_counts([50.0, *times]) == [PER_WINDOW, 1]
    assert times[-2:] == [61.0, 50.0 + NEXT]


async def test_an_unsent_call_after_a_restart_takes_no_place_either(
    pacer: WindowPacer, clock: VirtualTime
) -> None:
    clock.now = 100.0
    pacer.replay([80.0] * 25)
    pacer.unused(await pacer.acquire())

    times = await grants_in_turn(pacer, clock, 6)

    assert times == [100.0] * 5 + [80.0 + NEXT]
