"""A directory that fails a share of every kind of call, sleeps, and restarts mid-batch."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from service.local_directory import DirectoryOptions, RunningDirectory, StandIn, run_directory
from service.local_directory.storage import Hospital, NewHospital
from service.processing import upstream
from service.processing.directory_client import Answer, DirectoryClient, Outcome
from tests.integration.chaos import TALLY, assert_exactly_once, trials
from tests.support import Service, ServiceFactory, csv_of

FAULTS = (
    "429",
    "500",
    "502",
    "503",
    "504",
    "reset",
    "hang",
    "commit_drop",
    "commit_502",
    "commit_504",
)
ENDPOINTS = ("create", "batch_get", "batch_activate")


def on_request(
    monkeypatch: pytest.MonkeyPatch, standin: StandIn, act: Callable[[str, int], str | None]
) -> None:
    """Call `act(endpoint, n)` as the stand-in takes its nth request to `endpoint`; a fault
    kind it returns is struck instead of whatever the stand-in's rules chose."""
    receive = standin.receive

    def acting(endpoint: str) -> str | None:
        fault = receive(endpoint)
        return act(endpoint, standin.request_counts[endpoint]) or fault

    monkeypatch.setattr(standin, "receive", acting)


async def test_a_rollback_asked_for_while_activating_stops_the_next_patch(
    service_factory: ServiceFactory, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin
    patched = asyncio.Event()

    def hang_the_first_patch(endpoint: str, n: int) -> str | None:
        if endpoint == "batch_activate" and n == 1:
            patched.set()
            return "hang"  # unanswered, not done: activation would ask again
        return None

    on_request(monkeypatch, standin, hang_the_first_patch)
    async with service_factory(read_timeout=1.0) as service:
        batch_id = (await service.upload(csv_of(25)))["batch_id"]  # two upstream batches
        async with asyncio.timeout(20):
            await patched.wait()
        async with service.http.delete(f"{service.url}/batch/{batch_id}") as r:
            assert r.status == 202
        final = await service.wait_finished(batch_id)

    assert standin.request_counts["batch_activate"] == 1
    assert final["rolled_back"] is True
    assert final["batch_activated"] is False
    assert standin.all_hospitals() == []


async def test_a_create_answered_2xx_without_an_id_is_looked_up_not_sent_again(
    service_factory: ServiceFactory, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy in front of the directory could answer 200 with a body of its own: the create
    # may be stored, so the row is checked against the directory, never sent blind.
    create = DirectoryClient.create
    answers = itertools.count(1)

    async def first_answer_without_id(client: DirectoryClient, *row: Any) -> Answer:
        answer = await create(client, *row)
        if next(answers) == 1:
            return Answer(Outcome.OK, 200, {"status": "OK"}, "ok")
        return answer

    monkeypatch.setattr(DirectoryClient, "create", first_answer_without_id)
    async with service_factory() as service:
        batch_id = (await service.upload(csv_of(3)))["batch_id"]
        final = await service.wait_finished(batch_id)

    assert final["processing_status"] == "completed"
    assert {h["hospital_id"] for h in final["hospitals"]} == {
        h["id"] for h in directory.standin.all_hospitals()
    }
    assert directory.standin.request_counts["create"] == 3
    assert directory.standin.request_counts["batch_get"] >= 1


@pytest.mark.parametrize(("fault", "reads"), [("commit_504", 1), ("reset", 2)])
async def test_a_check_reads_twice_before_it_sends_a_missing_row_again(
    service_factory: ServiceFactory, directory: RunningDirectory, fault: str, reads: int
) -> None:
    # A row the check's first read finds is claimed; one it misses may be in a create the
    # directory has started but not stored, so it is sent again only if a second read,
    # settle_seconds later, misses it too.
    directory.standin.add_fault("create", fault, nth=[1])
    async with service_factory(settle_seconds=0.3) as service:
        final = await service.wait_finished((await service.upload(csv_of(2)))["batch_id"])

    stored = directory.standin.all_hospitals()
    assert final["processing_status"] == "completed", final["hospitals"]
    assert sorted(h["hospital_id"] for h in final["hospitals"]) == sorted(h["id"] for h in stored)
    assert len(stored) == 2
    assert directory.standin.request_counts["batch_get"] == reads + 1  # and activation's


async def test_a_row_never_stored_is_given_up_after_max_attempts_creates(
    service_factory: ServiceFactory, directory: RunningDirectory, caplog: pytest.LogCaptureFixture
) -> None:
    directory.standin.add_fault("create", "reset")  # every create: unanswered, not stored
    async with service_factory(max_attempts=2) as service:
        batch_id = (await service.upload(csv_of(1)))["batch_id"]
        final = await service.wait_finished(batch_id)

    assert directory.standin.request_counts["create"] == 2
    (row,) = final["hospitals"]
    assert row["status"] == "failed"
    assert "gave up after 2 failed attempts" in row["error_message"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    said = f"batch {batch_id} failed: 0 created, 1 failed, 0 deleted of 1 rows; row 1: gave up"
    assert any(message.startswith(said) for message in warned), warned


@pytest.mark.parametrize(
    ("kind", "said"),
    [("503", "unclear answer (HTTP 503"), ("reset", "unclear answer (ClientOSError")],
)
async def test_a_row_given_up_after_unclear_answers_keeps_what_the_directory_answered(
    service_factory: ServiceFactory, directory: RunningDirectory, kind: str, said: str
) -> None:
    # Each create is answered unclearly, then looked for and not found. The row's message
    # must still say what the directory answered: it is what an operator can act on.
    directory.standin.add_fault("create", kind)
    async with service_factory(max_attempts=2) as service:
        batch_id = (await service.upload(csv_of(1)))["batch_id"]
        final = await service.wait_finished(batch_id)

    (row,) = final["hospitals"]
    assert row["status"] == "failed"
    assert row["error_message"].startswith(
        "gave up after 2 failed attempts: not in the directory when looked up"
    )
    assert said in row["error_message"], row["error_message"]


async def assert_identical_rows_hold_a_record_each(
    service_factory: ServiceFactory, standin: StandIn
) -> None:
    """Upload two identical rows: the batch completes, each row with a record of its own."""
    identical = "name,address,phone\nSame,1 Main St,555\nSame,1 Main St,555\n"
    async with service_factory(settle_seconds=0.3) as service:
        final = await service.wait_finished((await service.upload(identical))["batch_id"])

    assert final["processing_status"] == "completed"
    ids = sorted(h["hospital_id"] for h in final["hospitals"])
    assert ids == sorted(h["id"] for h in standin.all_hospitals())
    assert len(set(ids)) == 2


async def test_a_check_never_claims_the_record_of_an_identical_row_still_in_flight(
    service_factory: ServiceFactory, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two identical rows. Row 1's create is lost unstored; row 2's is stored but its answer
    # is held back. Read before row 2's answer came, the directory would show row 1 a
    # record that is row 2's: the check must wait for the creates in flight.
    standin = directory.standin
    standin.add_fault("create", "reset", nth=[1])
    store_after_the_delay = standin._sleep_then_store
    held: list[Hospital] = []

    async def hold_the_first_answer(new: NewHospital) -> Hospital:
        hospital = await store_after_the_delay(new)
        if not held:
            held.append(hospital)
            await asyncio.sleep(1.5)  # stored and listed in its batch, not yet answered
        return hospital

    monkeypatch.setattr(standin, "_sleep_then_store", hold_the_first_answer)
    await assert_identical_rows_hold_a_record_each(service_factory, standin)


async def test_a_record_listed_twice_is_claimed_by_one_identical_row_only(
    service_factory: ServiceFactory, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two identical rows; one create is answered 502 and not stored. A listing that shows
    # the other row's record twice must not let the unstored row claim it as well.
    standin = directory.standin
    standin.add_fault("create", "502", nth=[2])
    listed = standin.store.batch
    monkeypatch.setattr(standin.store, "batch", lambda batch_id: listed(batch_id) * 2)
    await assert_identical_rows_hold_a_record_each(service_factory, standin)


@pytest.mark.parametrize("seed", trials(quick=2, long=20))
async def test_a_third_of_calls_failing_still_creates_each_row_exactly_once(
    seed: int, service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    for i, endpoint in enumerate(ENDPOINTS):
        for j, kind in enumerate(FAULTS):
            share = 0.3 / len(FAULTS)
            directory.standin.add_fault(
                endpoint, kind, probability=share, seed=seed * 100 + i * 10 + j
            )
    async with service_factory(read_timeout=1.0, max_attempts=8) as service:
        batches = [(await service.upload(csv_of(n, f"B{n}")))["batch_id"] for n in (45, 7)]
        finals = [await service.wait_finished(b, within=120) for b in batches]
    injected = sum(rule.fired for rule in directory.standin.faults.rules)
    TALLY["directory faults injected"] += injected
    assert injected >= 5
    assert_exactly_once(directory.standin, finals)
    # Where the directory kept its data, a batch can only end completed, or failed with reasons.
    for final in finals:
        if final["processing_status"] != "completed":
            assert final["activation_error"] or any(h["error_message"] for h in final["hospitals"])


async def test_a_cold_start_delays_but_does_not_fail_the_first_rows(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    directory.standin.cold_start(1.5)
    async with service_factory(read_timeout=0.5, warmup_timeout=5.0) as service:
        batch = (await service.upload(csv_of(5)))["batch_id"]
        final = await service.wait_finished(batch)
    assert final["processing_status"] == "completed"
    assert directory.standin.request_counts["root"] >= 1
    assert_exactly_once(directory.standin, [final])


async def test_a_failed_warm_up_names_the_directory_it_tried(
    service_factory: ServiceFactory,
    directory: RunningDirectory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    directory.standin.add_fault("root", "reset")
    async with service_factory() as service:
        final = await service.wait_finished((await service.upload(csv_of(1)))["batch_id"])

    assert final["processing_status"] == "completed"  # the creates go ahead regardless
    warned = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert warned, "no warning"
    assert warned[0].startswith(f"the directory at {directory.url} (directory.base_url)")


async def test_a_wrong_path_in_the_directory_s_address_is_named_in_each_row_s_error(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    # Another path on the directory's host answers, so nothing looks unreachable: each
    # create is answered 404, which the directory never answers to one.
    async with service_factory(base_url=f"{directory.url}/v1") as service:
        final = await service.wait_finished((await service.upload(csv_of(2)))["batch_id"])

    assert final["processing_status"] == "failed"
    assert {h["error_message"] for h in final["hospitals"]} == {
        "the directory refused the row (HTTP 404): Not Found; is directory.base_url "
        "(EXTERNAL_API_BASE_URL) the directory's address?"
    }
    assert directory.standin.all_hospitals() == []


async def test_a_directory_down_is_warned_of_once_and_its_return_is_said(
    service_factory: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing answers: every attempt of every row warmed it up again, and each failed warm-up
    # logged the same warning (41 lines for 10 rows in 12 s).
    caplog.set_level(logging.INFO, logger="service.processing.warmup")
    # Bound and not listening until the directory takes it: connections are refused, and the
    # service's own bind to port 0 cannot be handed the port meanwhile.
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        async with service_factory(base_url=f"http://127.0.0.1:{port}") as service:
            down = (await service.upload(csv_of(3)))["batch_id"]
            assert (await service.wait_finished(down))["processing_status"] == "failed"
            options = DirectoryOptions(create_delay=0.0, rate_limit=False)
            reserved.close()
            async with run_directory(options, port=port):
                up = (await service.upload(csv_of(2, prefix="Later")))["batch_id"]
                assert (await service.wait_finished(up))["processing_status"] == "completed"

    said = [(r.levelname, m) for r in caplog.records if "directory at" in (m := r.getMessage())]
    assert [level for level, _ in said] == ["WARNING", "INFO"], said
    assert "did not answer its warm-up" in said[0][1]
    assert said[1][1] == f"the directory at http://127.0.0.1:{port} answers again"


async def test_a_directory_restart_mid_batch_is_never_reported_completed(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(0.3)
    batch = (await service.upload(csv_of(45)))["batch_id"]
    async with asyncio.timeout(20):
        while len(directory.standin.all_hospitals()) < 20:
            await asyncio.sleep(0.02)
    directory.standin.restart()  # every hospital so far is gone
    final = await service.wait_finished(batch, within=30)

    assert final["processing_status"] == "failed"
    assert final["batch_activated"] is False
    assert "missing from the directory" in final["activation_error"]
    assert final["activation_error"].endswith(upstream.RELOAD)  # resuming would fail the same way
    assert not any(h["active"] for h in directory.standin.all_hospitals())


async def test_a_lost_first_upstream_batch_stops_activation_before_the_others(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin

    def lose_the_oldest_on_first_activation(endpoint: str, n: int) -> None:
        if endpoint == "batch_activate" and n == 1:
            oldest = min(standin.all_hospitals(), key=lambda h: h["id"])
            standin.store.delete_batch(oldest["creation_batch_id"])

    on_request(monkeypatch, standin, lose_the_oldest_on_first_activation)
    batch = (await service.upload(csv_of(65)))["batch_id"]  # four upstream batches
    final = await service.wait_finished(batch)

    assert final["processing_status"] == "failed"
    assert "missing from the directory" in final["activation_error"]
    assert standin.request_counts["batch_activate"] == 1
    assert len(standin.all_hospitals()) == 45 and not any(
        h["active"] for h in standin.all_hospitals()
    )


async def test_a_lost_later_upstream_batch_fails_activation_and_says_to_reload(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin

    def lose_the_newest_on_first_activation(endpoint: str, n: int) -> None:
        if endpoint == "batch_activate" and n == 1:  # the lead's, created first
            newest = max(standin.all_hospitals(), key=lambda h: h["id"])
            standin.store.delete_batch(newest["creation_batch_id"])

    on_request(monkeypatch, standin, lose_the_newest_on_first_activation)
    batch = (await service.upload(csv_of(45)))["batch_id"]  # upstream batches of 20, 20, 5
    final = await service.wait_finished(batch)

    error = final["activation_error"]
    assert final["processing_status"] == "failed"
    assert "5 of the 5 hospitals" in error and "activation answered" in error
    assert error.endswith(upstream.RELOAD)
    assert sum(h["active"] for h in standin.all_hospitals()) == 40  # the other two went ahead


async def test_a_lost_upstream_batch_says_to_reload_though_another_failed_before_it(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin

    def spoil_the_others_on_first_activation(endpoint: str, n: int) -> None:
        if endpoint == "batch_activate" and n == 1:  # the lead's, created first
            by_id = standin.store.all()
            lead, newest = by_id[0].creation_batch_id, by_id[-1].creation_batch_id
            middle = next(h for h in by_id if h.creation_batch_id not in (lead, newest))
            middle.active = True  # found partly active: no new upload would help it
            assert newest is not None
            standin.store.delete_batch(newest)  # lost: only a new upload brings it back

    on_request(monkeypatch, standin, spoil_the_others_on_first_activation)
    batch = (await service.upload(csv_of(45)))["batch_id"]  # upstream batches of 20, 20, 5
    final = await service.wait_finished(batch)

    error = final["activation_error"]
    assert final["processing_status"] == "failed"
    assert "only partly active (1 of 20)" in error and "(and 1 more upstream batches)" in error
    assert error.endswith(upstream.RELOAD)  # said for the lost one, though it failed second


async def test_an_activation_rate_limited_every_time_is_sent_max_attempts_times_in_all(
    service_factory: ServiceFactory, directory: RunningDirectory
) -> None:
    directory.standin.add_fault("batch_activate", "429")
    async with service_factory(max_attempts=3, rate_window_seconds=0.1) as service:
        final = await service.wait_finished((await service.upload(csv_of(3)))["batch_id"])

    assert final["processing_status"] == "failed"
    assert "did not take effect" in final["activation_error"]
    assert directory.standin.request_counts["batch_activate"] == 3  # not 3 rounds of 3


async def test_a_rate_limited_activation_waits_out_the_rate_window_before_asking_again(
    service_factory: ServiceFactory, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin
    patched_at: list[float] = []

    def refuse_the_first_activation(endpoint: str, n: int) -> str | None:
        if endpoint == "batch_activate":
            patched_at.append(time.monotonic())
            return "429" if n == 1 else None
        return None

    on_request(monkeypatch, standin, refuse_the_first_activation)
    monkeypatch.setattr(upstream, "backoff", lambda attempt, base, cap: 0.0)
    async with service_factory(rate_window_seconds=0.4) as service:
        final = await service.wait_finished((await service.upload(csv_of(3)))["batch_id"])

    assert final["processing_status"] == "completed"
    # No Retry-After: a 429 is waited out for a whole window, not a backoff's fraction of it.
    assert len(patched_at) == 2 and patched_at[1] - patched_at[0] >= 0.4


async def test_an_activation_that_activates_fewer_than_the_batch_holds_is_not_completed(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin

    def lose_one_on_activation(endpoint: str, n: int) -> None:
        if endpoint == "batch_activate" and n == 1:  # after the look before activating
            standin.store.delete(standin.store.all()[-1].id)

    on_request(monkeypatch, standin, lose_one_on_activation)
    final = await service.wait_finished((await service.upload(csv_of(3)))["batch_id"])

    # The PATCH answered 200 with an activated_count of 2: short of the batch, not a success.
    assert final["processing_status"] == "failed"
    assert final["batch_activated"] is False
    assert "1 of the 3 hospitals" in final["activation_error"]
    assert final["activation_error"].endswith(upstream.RELOAD)


async def test_a_batch_found_partly_active_is_neither_activated_again_nor_completed(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin

    def activate_one_member_first(endpoint: str, n: int) -> None:
        if endpoint == "batch_activate" and n == 1:  # as someone else's PATCH could have
            standin.store.all()[0].active = True

    on_request(monkeypatch, standin, activate_one_member_first)
    final = await service.wait_finished((await service.upload(csv_of(3)))["batch_id"])

    # The PATCH answered 400 and the batch shows 1 of 3 active: a second PATCH cannot help.
    assert final["processing_status"] == "failed"
    assert "only partly active (1 of 3)" in final["activation_error"]
    assert standin.request_counts["batch_activate"] == 1


async def test_a_batch_found_partly_active_before_its_activation_is_not_completed(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin

    def activate_one_member_before_the_look(endpoint: str, n: int) -> None:
        if endpoint == "batch_get" and n == 1:  # the look before activating
            standin.store.all()[0].active = True

    on_request(monkeypatch, standin, activate_one_member_before_the_look)
    final = await service.wait_finished((await service.upload(csv_of(3)))["batch_id"])

    # One active member is not the batch activated before a crash: two are still inactive.
    assert final["processing_status"] == "failed"
    assert final["batch_activated"] is False
    assert "only partly active (1 of 3)" in final["activation_error"]
    assert sum(h["active"] for h in standin.all_hospitals()) == 1


# Identical rows are distinct hospitals: after a restart gives the same ids again, only the
# directory's created_at tells a new record from the one a row got before.
IDENTICAL = "name,address,phone\n" + "Same Clinic,1 Main St,555-0001\n" * 8
EIGHT_ROWS = [pytest.param(csv_of(8), id="distinct"), pytest.param(IDENTICAL, id="identical")]


@pytest.mark.parametrize("content", EIGHT_ROWS)
async def test_a_restart_inside_an_upstream_batch_activates_none_of_it(
    service_factory: ServiceFactory,
    directory: RunningDirectory,
    monkeypatch: pytest.MonkeyPatch,
    content: str,
) -> None:
    standin = directory.standin

    def restart_at_the_fifth_create(endpoint: str, n: int) -> None:
        if endpoint == "create" and n == 5:
            standin.restart()  # rows 1-4 are gone, and rows 5-8 get their ids 1-4 again

    on_request(monkeypatch, standin, restart_at_the_fifth_create)
    async with service_factory(concurrency=1) as service:  # one upstream batch, row by row
        final = await service.wait_finished((await service.upload(content))["batch_id"])

    assert [h["hospital_id"] for h in final["hospitals"]] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert final["processing_status"] == "failed"
    assert final["batch_activated"] is False
    assert "4 of the 8 hospitals" in final["activation_error"]
    assert "nothing was activated" in final["activation_error"]
    assert standin.request_counts["batch_activate"] == 0
    assert len(standin.all_hospitals()) == 4
    assert not any(h["active"] for h in standin.all_hospitals())


@pytest.mark.parametrize("content", EIGHT_ROWS)
async def test_a_lost_answer_after_a_restart_is_found_though_an_earlier_row_holds_its_id(
    service_factory: ServiceFactory,
    directory: RunningDirectory,
    monkeypatch: pytest.MonkeyPatch,
    content: str,
) -> None:
    standin = directory.standin

    def restart_at_the_fourth_create(endpoint: str, n: int) -> str | None:
        if endpoint != "create" or not 4 <= n <= 5:
            return None
        if n == 4:
            standin.restart()  # rows 1-3 are gone; ids start again at 1
        return "commit_drop"  # rows 4 and 5 are stored, as ids 1 and 2, and not answered

    on_request(monkeypatch, standin, restart_at_the_fourth_create)
    async with service_factory(concurrency=1) as service:
        final = await service.wait_finished((await service.upload(content))["batch_id"])

    ids = [h["hospital_id"] for h in final["hospitals"]]
    assert ids == [1, 2, 3, 1, 2, 3, 4, 5]
    assert standin.request_counts["create"] == 8  # none sent twice
    assert len(standin.all_hospitals()) == 5
    assert final["processing_status"] == "failed"
    assert "3 of the 8 hospitals" in final["activation_error"]
    assert not any(h["active"] for h in standin.all_hospitals())


async def test_activation_looks_first_at_the_upstream_batch_created_first(
    service_factory: ServiceFactory, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin
    standin.set_delay(0.1)
    standin.cold_start(0.5)  # rows 1-20 all arrive before the first answer lets row 21 go
    standin.add_fault("create", "500", nth=range(1, 21))  # rows 1-20 wait to be checked

    def restart_before_the_first_retry(endpoint: str, n: int) -> None:
        if endpoint == "create" and n == 26:
            standin.restart()  # rows 21-25, created first, are gone

    on_request(monkeypatch, standin, restart_before_the_first_retry)
    # Rows 21-25 take 0.1 s; the first retry comes two settles after rows 1-20 were sent:
    # 0.3 s each left too little room on a loaded machine (one of them stored in time).
    async with service_factory(settle_seconds=1.0) as service:
        final = await service.wait_finished((await service.upload(csv_of(25)))["batch_id"])

    assert sorted(h["id"] for h in standin.all_hospitals()) == list(range(1, 21))  # rows 1-20
    assert final["processing_status"] == "failed"
    assert "5 of the 5 hospitals" in final["activation_error"]
    assert "nothing was activated" in final["activation_error"]
    assert standin.request_counts["batch_activate"] == 0
    assert not any(h["active"] for h in standin.all_hospitals())


async def test_activation_looks_first_at_the_oldest_record_not_the_row_recorded_first(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin
    standin.set_delay(0.1)

    def lose_answers_then_fill_the_fifo(endpoint: str, n: int) -> str | None:
        if endpoint == "create" and n <= 20:
            return "commit_drop"  # rows 1-20 are stored first, and recorded after a check
        if endpoint == "batch_get" and n == 2:  # the read before activating, after the check
            for i in range(standin.options.capacity - len(standin.store) + 1):
                standin.store.add(NewHospital(f"Other {i}", "Elsewhere", None, None))
        return None

    on_request(monkeypatch, standin, lose_answers_then_fill_the_fifo)
    final = await service.wait_finished((await service.upload(csv_of(25)))["batch_id"])

    rows = {h["row"]: h for h in final["hospitals"]}
    assert rows[1]["hospital_id"] == 1 and standin.store.get(1) is None  # the oldest, dropped
    assert final["processing_status"] == "failed"
    assert "1 of the 20 hospitals" in final["activation_error"]
    assert "nothing was activated" in final["activation_error"]
    assert standin.request_counts["batch_activate"] == 0
    ours = [h for h in standin.all_hospitals() if h["creation_batch_id"] is not None]
    assert len(ours) == 24 and not any(h["active"] for h in ours)


async def test_an_activation_answered_ok_that_activates_nothing_says_so(
    service_factory: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy that answers 200 {} and never passes the PATCH on: "did not take effect: ok"
    # told nobody anything.
    async def unheard(self: DirectoryClient, creation_batch_id: str) -> Answer:
        return Answer(Outcome.OK, 200, {}, "ok")

    monkeypatch.setattr(DirectoryClient, "activate", unheard)
    monkeypatch.setattr(upstream, "backoff", lambda attempt, base, cap: 0.01)
    async with service_factory(max_attempts=2) as service:
        final = await service.wait_finished((await service.upload(csv_of(3)))["batch_id"])

    assert final["processing_status"] == "failed"
    assert final["activation_error"].endswith(
        "did not take effect: it answered 200, yet none of its hospitals is active"
    )


async def test_an_activation_refused_at_once_is_asked_again_after_a_pause(
    service: Service, directory: RunningDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin = directory.standin
    standin.add_fault("batch_activate", "503")  # every time, as a proxy in trouble
    patched_at: list[float] = []

    def noting_activations(endpoint: str, n: int) -> None:
        if endpoint == "batch_activate":
            patched_at.append(time.monotonic())

    on_request(monkeypatch, standin, noting_activations)
    monkeypatch.setattr(upstream, "backoff", lambda attempt, base, cap: 0.05 * attempt)
    final = await service.wait_finished((await service.upload(csv_of(3)))["batch_id"])

    assert final["processing_status"] == "failed"
    assert "did not take effect: HTTP 503" in final["activation_error"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(patched_at)]
    assert len(patched_at) == 5  # max_attempts
    assert all(gap >= 0.05 * n for n, gap in enumerate(gaps, 1))
