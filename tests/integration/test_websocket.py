"""The websockets against the real service: order, resume with ?after, lag, origin, shutdown."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from service.domain import batch as b
from service.domain import events as ev
from service.local_directory import RunningDirectory
from service.store.records import NewEvent, StoredEvent, from_row
from service.web import presenters, websocket
from service.web.batches import existing_batch
from service.web.keys import STOPPING, STORE
from tests.integration.conftest import completing, new_batch, requested, run_sql
from tests.support import SAMPLE_CSV, Service, csv_of, fast_settings, running_service


async def received(ws: aiohttp.ClientWebSocketResponse, count: int | None = None) -> list[Any]:
    """The next `count` messages, or every message until the server closes."""
    messages: list[Any] = []
    async with asyncio.timeout(20):
        while count is None or len(messages) < count:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                assert count is None, f"closed early ({ws.close_code}) after {messages}"
                break
            messages.append(msg.json())
    return messages


async def close_of(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    """The first message that is not data: how the server ended the socket."""
    while True:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return msg


async def history(service: Service, batch_id: str) -> list[dict[str, Any]]:
    """Every event of the batch from the audit API."""
    _, page = await service.get(f"/batch/{batch_id}/events?limit=1000")
    return list(page["events"])


def progress_after(events: list[dict[str, Any]], version: int) -> dict[str, Any]:
    """The progress a fold of the first version + 1 events gives: what a message must carry."""
    stored = [StoredEvent(**e) for e in events[: version + 1]]
    state = b.fold((e.decode(), e.recorded_at) for e in stored)
    return presenters.progress(presenters.records_of(state)[0])


async def wait_processed(service: Service, batch_id: str, at_least: int) -> None:
    async with asyncio.timeout(20):
        while True:
            _, body = await service.get(f"/batch/{batch_id}/progress")
            if body["processed_hospitals"] >= at_least:
                return
            await asyncio.sleep(0.02)


async def test_a_client_connected_mid_batch_gets_every_later_version_in_order(
    service_factory: Any,
) -> None:
    async with service_factory(concurrency=2) as service:
        accepted = await service.upload(csv_of(8))
        batch_id = accepted["batch_id"]
        await wait_processed(service, batch_id, 2)
        async with service.http.ws_connect(f"{service.url}/batch/{batch_id}/ws") as ws:
            messages = await received(ws)
            assert ws.close_code == 1000
        events = await history(service, batch_id)

    snapshot, *updates, final = messages
    k, n = snapshot["version"], events[-1]["stream_version"]
    assert snapshot["type"] == "snapshot" and 0 < k < n
    assert snapshot["progress"] == progress_after(events, k)
    assert snapshot["status"]["version"] == k
    assert [m["version"] for m in updates] == list(range(k + 1, n + 1))
    for message in updates:
        assert message["type"] == "event"
        assert message["event"] == events[message["version"]]
        assert message["progress"] == progress_after(events, message["version"])
    assert final["type"] == "finished" and final["version"] == n
    assert final["progress"]["processing_status"] == "completed"
    assert final["progress"]["processed_hospitals"] == 8
    assert [h["status"] for h in final["status"]["hospitals"]] == ["created_and_activated"] * 8


async def test_reconnecting_with_after_resumes_without_gap_or_repeat(service: Service) -> None:
    accepted = await service.upload(csv_of(6))
    url = f"{service.url}/batch/{accepted['batch_id']}/ws"
    async with service.http.ws_connect(url) as ws:
        first = await received(ws, 3)
    last = first[-1]["version"]
    async with service.http.ws_connect(f"{url}?after={last}") as ws:
        rest = await received(ws)
        assert ws.close_code == 1000
    events = await history(service, accepted["batch_id"])

    assert first[0]["type"] == "snapshot"
    assert all(m["type"] != "snapshot" for m in rest)
    versions = [m["version"] for m in first[1:] + rest[:-1]]
    assert versions == list(range(first[0]["version"] + 1, len(events)))
    assert rest[-1]["type"] == "finished"


async def test_after_on_a_finished_batch_replays_the_rest_then_finishes(service: Service) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    final = await service.wait_finished(accepted["batch_id"])
    url = f"{service.url}/batch/{accepted['batch_id']}/ws"
    events = await history(service, accepted["batch_id"])
    n = events[-1]["stream_version"]

    async with service.http.ws_connect(f"{url}?after=-1") as ws:
        everything = await received(ws)
    async with service.http.ws_connect(f"{url}?after=2") as ws:
        tail = await received(ws)
    async with service.http.ws_connect(f"{url}?after={n}") as ws:
        nothing_new = await received(ws)
        assert ws.close_code == 1000

    assert [m["event"] for m in everything[:-1]] == events
    assert [m["version"] for m in tail[:-1]] == list(range(3, n + 1))
    assert [m["type"] for m in nothing_new] == ["finished"]
    assert nothing_new[0]["status"]["hospitals"] == final["hospitals"]


async def test_a_finished_batch_gets_its_snapshot_and_the_final_message(service: Service) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    final = await service.wait_finished(accepted["batch_id"])
    async with service.http.ws_connect(f"{service.url}/batch/{accepted['batch_id']}/ws") as ws:
        messages = await received(ws)
        assert ws.close_code == 1000

    assert [m["type"] for m in messages] == ["snapshot", "finished"]
    assert messages[0]["version"] == messages[1]["version"] == final["version"]
    assert messages[0]["status"]["hospitals"] == final["hospitals"]
    assert messages[1]["progress"]["processing_status"] == "completed"


async def test_a_client_slow_to_read_the_close_still_gets_a_clean_close(
    service: Service,
) -> None:
    # The close handshake waited aiohttp's 10 s for the client's reply, not the
    # heartbeat_seconds (20) a message may wait to be taken: a client still working through
    # its backlog found the connection dropped, and saw 1006 after `finished`.
    batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
    await service.wait_finished(batch_id)
    url = f"{service.url}/batch/{batch_id}/ws"
    async with service.http.ws_connect(url, heartbeat=None) as ws:
        await asyncio.sleep(11)  # snapshot, finished and the close wait unread
        kinds = [msg.json()["type"] async for msg in ws]
    assert kinds == ["snapshot", "finished"]
    assert ws.close_code == 1000


async def test_a_client_that_never_answers_the_close_is_reset(
    directory: RunningDirectory, db_path: Path
) -> None:
    # A plain close left the kernel holding what such a client had not read, for as long
    # as it stayed connected: 500 of them held 1.2 GB of the host's memory.
    settings = fast_settings(db_path, directory.url).replace(websocket={"heartbeat_seconds": 0.3})
    async with running_service(settings) as service:
        batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
        await service.wait_finished(batch_id)
        url = URL(service.url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(
            f"GET /batch/{batch_id}/ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        try:
            received = b""
            with pytest.raises(ConnectionResetError):  # not the end of the stream
                async with asyncio.timeout(5):
                    while chunk := await reader.read(65536):  # a close it never answers
                        received += chunk
        finally:
            writer.close()

    assert received.startswith(b"HTTP/1.1 101 ") and b'"finished"' in received


async def test_several_clients_on_one_batch_see_the_same_events(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(0.3)
    accepted = await service.upload(csv_of(4))
    url = f"{service.url}/batch/{accepted['batch_id']}/ws?after=0"
    sockets = [await service.http.ws_connect(url) for _ in range(3)]
    try:
        streams = await asyncio.gather(*(received(ws) for ws in sockets))
    finally:
        for ws in sockets:
            await ws.close()

    events = await history(service, accepted["batch_id"])
    assert streams[0][-1]["type"] == "finished"
    assert [m["version"] for m in streams[0][:-1]] == list(range(1, len(events)))
    assert streams[0] == streams[1] == streams[2]


async def test_an_event_larger_than_64_kib_arrives_whole(service: Service) -> None:
    batch_id = str(uuid.uuid4())
    await service.app[STORE].append(b.stream_id(batch_id), -1, new_batch(batch_id, rows=2000))
    async with service.http.ws_connect(f"{service.url}/batch/{batch_id}/ws?after=-1") as ws:
        msg = await ws.receive(timeout=20)

    assert msg.type is aiohttp.WSMsgType.TEXT and len(msg.data) > 1 << 16
    assert msg.json()["event"]["event_type"] == "BatchCreated"
    assert len(msg.json()["event"]["data"]["rows"]) == 2000


async def test_handshakes_that_are_refused_before_the_upgrade(service: Service) -> None:
    batch_id = (await service.upload(SAMPLE_CSV))["batch_id"]
    last = (await service.wait_finished(batch_id))["version"]
    refused = {
        f"/batch/{uuid.uuid4()}/ws": 404,
        "/batch/not-a-uuid/ws": 422,
        f"/batch/{batch_id}/ws?after={last + 1}": 422,  # just past: it would wait forever
        f"/batch/{batch_id}/ws?after=99": 422,
        f"/batch/{batch_id}/ws?after=x": 422,
        "/ws?after=-5": 422,
    }
    for path, status in refused.items():
        with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
            await service.http.ws_connect(service.url + path)
        assert raised.value.status == status, path
    status, body = await service.get(f"/batch/{batch_id}/ws")
    assert status == 400
    assert "websocket" in body["detail"]


async def test_the_dashboard_resumes_after_a_position_committed_before_the_head_moves(
    service: Service,
) -> None:
    store = service.app[STORE]
    await service.wait_finished((await service.upload(SAMPLE_CSV))["batch_id"])
    # A commit the loop has not taken in yet: the log holds it, the head does not.
    run_sql(
        Path(service.db_path),
        "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, "
        "data, metadata, recorded_at) SELECT 'e-late', stream_id, stream_version + 1000, "
        "event_type, schema_version, data, metadata, recorded_at FROM events LIMIT 1",
    )
    ((committed,),) = run_sql(Path(service.db_path), "SELECT MAX(global_position) FROM events")
    assert committed == store.head.position + 1

    async with service.http.ws_connect(f"{service.url}/ws?after={committed}") as ws:
        assert not ws.closed
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await service.http.ws_connect(f"{service.url}/ws?after={committed + 1}")
    assert raised.value.status == 422


async def test_cross_origin_handshakes_are_refused_unless_configured(
    directory: RunningDirectory, db_path: Path
) -> None:
    settings = fast_settings(db_path, directory.url).replace(
        websocket={"allowed_origins": ("https://dashboard.example",)}
    )
    async with running_service(settings) as service:
        with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
            await service.http.ws_connect(
                f"{service.url}/ws", headers={"Origin": "https://evil.example"}
            )
        assert raised.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as raised:  # not a URL: was a 500
            await service.http.ws_connect(f"{service.url}/ws", headers={"Origin": "http://[::1"})
        assert raised.value.status == 403
        for origin in (service.url, "https://dashboard.example"):
            async with service.http.ws_connect(
                f"{service.url}/ws", headers={"Origin": origin}
            ) as ws:
                assert (await received(ws, 1))[0]["type"] == "snapshot"


async def test_shutdown_closes_every_socket_with_going_away(
    directory: RunningDirectory, db_path: Path
) -> None:
    directory.standin.set_delay(5.0)
    async with aiohttp.ClientSession() as http:
        async with running_service(fast_settings(db_path, directory.url)) as service:
            accepted = await service.upload(SAMPLE_CSV)
            batch_ws = await http.ws_connect(f"{service.url}/batch/{accepted['batch_id']}/ws")
            dashboard_ws = await http.ws_connect(f"{service.url}/ws")
            await received(batch_ws, 1)
            await received(dashboard_ws, 1)
            # Reading while the service stops, as a live client does, so it answers the close.
            closes = [asyncio.create_task(close_of(ws)) for ws in (batch_ws, dashboard_ws)]
        async with asyncio.timeout(5):
            messages = await asyncio.gather(*closes)
    assert [m.type for m in messages] == [aiohttp.WSMsgType.CLOSE] * 2
    assert [m.data for m in messages] == [1001, 1001]
    assert batch_ws.closed and dashboard_ws.closed


async def test_a_socket_upgraded_as_the_service_stops_is_closed_with_going_away(
    directory: RunningDirectory, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory.standin.set_delay(5.0)
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(request: web.Request) -> dict[str, Any]:  # a handshake still reading
        entered.set()
        await release.wait()
        return await existing_batch(request)

    monkeypatch.setattr(websocket, "existing_batch", held)
    settings = fast_settings(db_path, directory.url).replace(app={"shutdown_timeout": 5.0})
    async with aiohttp.ClientSession() as http:
        running = running_service(settings)
        service = await running.__aenter__()
        url = f"{service.url}/batch/{(await service.upload(SAMPLE_CSV))['batch_id']}/ws"
        connecting = asyncio.create_task(http.ws_connect(url))
        await entered.wait()
        stopping = asyncio.create_task(running.__aexit__(None, None, None))
        async with asyncio.timeout(5):
            await service.app[STOPPING].wait()  # every socket open then was closed
        release.set()
        ws = await connecting
        async with asyncio.timeout(3):  # not the shutdown timeout (5 s), twice over
            close = await close_of(ws)
        await stopping

    assert (close.type, close.data) == (aiohttp.WSMsgType.CLOSE, 1001)


@pytest.fixture
async def lagging_service(
    directory: RunningDirectory, db_path: Path
) -> AsyncIterator[tuple[Service, str]]:
    """A service that tolerates 2 events of lag, and a batch no worker touches."""
    settings = fast_settings(db_path, directory.url).replace(websocket={"max_backlog": 2})
    async with running_service(settings) as service:
        batch_id = str(uuid.uuid4())
        await service.app[STORE].append(b.stream_id(batch_id), -1, new_batch(batch_id))
        yield service, batch_id


async def test_a_client_that_falls_behind_is_told_to_resync_and_loses_nothing(
    lagging_service: tuple[Service, str],
) -> None:
    service, batch_id = lagging_service
    store, stream = service.app[STORE], b.stream_id(batch_id)
    url = f"{service.url}/batch/{batch_id}/ws"
    async with service.http.ws_connect(url) as ws:
        (snapshot,) = await received(ws, 1)
        await store.append(stream, 0, requested(batch_id, 6))  # while the client reads nothing
        before_close = await received(ws, 1)
        async with asyncio.timeout(5):
            close = await close_of(ws)
    assert close.type is aiohttp.WSMsgType.CLOSE
    assert close.data == 4000 and "?after=1" in str(close.extra)
    last = before_close[-1]["version"]
    async with service.http.ws_connect(f"{url}?after={last}") as ws:
        rest = await received(ws, 6 - last)  # a replay longer than the backlog is not lag
        await store.append(stream, 6, requested(batch_id, 1))
        live = await received(ws, 1)

    assert snapshot["version"] == 0
    assert [m["version"] for m in before_close] == [1]
    assert [m["version"] for m in rest + live] == list(range(last + 1, 8))
    assert all(m["progress"]["processing_status"] == "processing" for m in rest + live)


async def test_a_client_that_keeps_up_is_never_told_to_resync(
    lagging_service: tuple[Service, str],
) -> None:
    # The lag is that of the first event a write sends, not of the first since the socket
    # opened: else a client reading every event at once was told to resync all the same.
    service, batch_id = lagging_service
    store, stream = service.app[STORE], b.stream_id(batch_id)
    seen: list[dict[str, Any]] = []
    async with service.http.ws_connect(f"{service.url}/batch/{batch_id}/ws") as ws:
        await received(ws, 1)
        for version in range(1, 7):  # three times the backlog, one event at a time
            await store.append(stream, version - 1, requested(batch_id, 1))
            seen += await received(ws, 1)

    assert [m["version"] for m in seen] == list(range(1, 7))


async def test_the_dashboard_snapshot_holds_the_newest_batches_and_no_more(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(websocket, "DASHBOARD_BATCHES", 2)
    ids = []
    for n in range(3):
        accepted = await service.upload(csv_of(1, prefix=f"Batch {n}"))
        await service.wait_finished(accepted["batch_id"])
        ids.append(accepted["batch_id"])

    async with service.http.ws_connect(f"{service.url}/ws") as ws:
        (snapshot,) = await received(ws, 1)

    assert [x["batch_id"] for x in snapshot["batches"]] == [ids[2], ids[1]]


async def test_a_rollback_of_a_completed_batch_is_followed_to_its_end(
    lagging_service: tuple[Service, str],
) -> None:
    # The batch reads completed until its hospitals are deleted: a `finished` sent at the
    # request closed the socket before the rollback it followed had ended.
    service, batch_id = lagging_service
    store, stream = service.app[STORE], b.stream_id(batch_id)
    await store.append(stream, 0, completing(batch_id))
    await store.append(stream, 4, [NewEvent(ev.BatchRollbackRequested())])
    async with service.http.ws_connect(f"{service.url}/batch/{batch_id}/ws?after=4") as ws:
        requested_message = await received(ws, 1)
        await store.append(stream, 5, [NewEvent(ev.BatchRolledBack(2, (batch_id,)))])
        rest = await received(ws)
        assert ws.close_code == 1000

    assert [m["version"] for m in requested_message + rest] == [5, 6, 6]
    assert [m["type"] for m in rest] == ["event", "finished"]
    assert rest[-1]["status"]["rolled_back"] is True


async def test_the_dashboard_follows_every_batch(service: Service) -> None:
    async with service.http.ws_connect(f"{service.url}/ws") as ws:
        (snapshot,) = await received(ws, 1)
        accepted = await service.upload(SAMPLE_CSV)
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["processing_status"] != "completed":
            (message,) = await received(ws, 1)
            assert message["type"] == "progress"
            seen += [x for x in message["batches"] if x["batch_id"] == accepted["batch_id"]]
    async with service.http.ws_connect(f"{service.url}/ws?after={snapshot['position']}") as ws:
        (replayed,) = await received(ws, 1)

    assert snapshot["type"] == "snapshot" and snapshot["batches"] == []
    assert [x["processed_hospitals"] for x in seen] == sorted(
        x["processed_hospitals"] for x in seen
    )
    assert seen[-1]["processed_hospitals"] == 3 and seen[-1]["file_name"] == "hospitals.csv"
    assert replayed["type"] == "progress"
    assert [x["batch_id"] for x in replayed["batches"]] == [accepted["batch_id"]]


async def test_a_dashboard_message_says_the_last_position_it_covers(service: Service) -> None:
    # A dashboard resumes with ?after=<position>: a position short of the page's last had it
    # read the same moves again on the next page, and sent them again on reconnecting.
    await service.wait_finished((await service.upload(SAMPLE_CSV))["batch_id"])
    end = service.app[STORE].head.position
    async with service.http.ws_connect(f"{service.url}/ws?after=0") as ws:
        (message,) = await received(ws, 1)

    assert end > 1
    assert (message["type"], message["position"]) == ("progress", end)


async def test_a_dashboard_gathers_the_moves_of_a_quarter_second_into_one_message(
    service: Service, directory: RunningDirectory
) -> None:
    directory.standin.set_delay(0.05)
    async with service.http.ws_connect(f"{service.url}/ws") as ws:
        await received(ws, 1)
        started = time.monotonic()
        accepted = await service.upload(csv_of(60))
        messages = 0
        while True:
            (message,) = await received(ws, 1)
            messages += 1
            mine = [x for x in message["batches"] if x["batch_id"] == accepted["batch_id"]]
            if mine and mine[-1]["processing_status"] == "completed":
                break
        elapsed = time.monotonic() - started

    assert messages <= elapsed / websocket.DASHBOARD_PAUSE + 1  # one a commit without the pause
    assert mine[-1]["processed_hospitals"] == 60


async def test_dashboards_decode_no_event_to_see_which_batches_moved(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each dashboard read whole pages of the log: 500 of them made 3 x 1,000 rows take 30 s
    # instead of 1.4 s, and 1,000 that did not read took the service to 2 GB.
    decoded = 0

    def counting(row: tuple[Any, ...]) -> StoredEvent:
        nonlocal decoded
        decoded += 1
        return from_row(row)

    dashboards = [await service.http.ws_connect(f"{service.url}/ws") for _ in range(10)]
    for ws in dashboards:
        await received(ws, 1)
    monkeypatch.setattr("service.store.event_store.from_row", counting)
    accepted = await service.upload(csv_of(40))
    for ws in dashboards:
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["processing_status"] != "completed":
            (message,) = await received(ws, 1)
            seen += [x for x in message["batches"] if x["batch_id"] == accepted["batch_id"]]
        await ws.close()
    monkeypatch.undo()
    events = await history(service, accepted["batch_id"])

    assert seen[-1]["processed_hospitals"] == 40
    assert decoded < len(events)  # ten dashboards decoded each event at least once each


async def test_heartbeat_pings_reach_the_client(directory: RunningDirectory, db_path: Path) -> None:
    settings = fast_settings(db_path, directory.url).replace(websocket={"heartbeat_seconds": 0.2})
    async with (
        running_service(settings) as service,
        service.http.ws_connect(f"{service.url}/ws", autoping=False) as ws,
    ):
        await received(ws, 1)
        async with asyncio.timeout(2):
            msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.PING


async def test_the_handshake_routes_are_documented(service: Service) -> None:
    status, spec = await service.get("/openapi.json")
    assert status == 200
    for path in ("/batch/{batch_id}/ws", "/ws"):
        operation = spec["paths"][path]["get"]
        assert "101" in operation["responses"]
        assert any(p["name"] == "after" for p in operation["parameters"])
    assert not [path for path, operations in spec["paths"].items() if "head" in operations]


@pytest.mark.parametrize("route", ["batch", "dashboard"])
async def test_the_upgrade_answer_carries_the_request_id(service: Service, route: str) -> None:
    accepted = await service.upload(SAMPLE_CSV)
    path = f"/batch/{accepted['batch_id']}/ws" if route == "batch" else "/ws"
    headers = {"X-Request-ID": "handshake-1"}
    async with service.http.ws_connect(f"{service.url}{path}", headers=headers) as ws:
        assert ws._response.status == 101
        assert ws._response.headers.get("X-Request-ID") == "handshake-1"
