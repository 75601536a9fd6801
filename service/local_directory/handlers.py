"""The directory's endpoints: validation, then a worker slot and the rate limit, then the work."""

from __future__ import annotations

from aiohttp import web

from service.local_directory.options import BATCH_CAP
from service.local_directory.responses import DirectoryError, json_answer, not_found
from service.local_directory.standin import STANDIN_KEY
from service.local_directory.storage import Hospital, HospitalStore
from service.local_directory.validation import (
    ErrorItem,
    ValidationFailed,
    hospital_changes,
    new_hospital,
    path_int,
    path_uuid,
    read_body,
)

HOSPITAL_NOT_FOUND = "Hospital not found"
BATCH_NOT_FOUND = "No hospitals found with the specified batch ID"


async def root(request: web.Request) -> web.Response:
    """`GET /`: the directory's liveness answer."""
    async with request.app[STANDIN_KEY].handling("root", request.remote):
        return json_answer({"status": "OK"})


async def create_hospital(request: web.Request) -> web.Response:
    """`POST /hospitals/`: 200 with the stored Hospital after the create delay."""
    standin = request.app[STANDIN_KEY]
    errors: list[ErrorItem] = []
    new = new_hospital(await read_body(request), errors)
    if new is None:
        raise ValidationFailed(errors)
    async with standin.handling("create", request.remote):
        batch_id = new.creation_batch_id
        # Only stored members count and the check precedes the delay, so concurrent creates
        # can overshoot the cap, as they do on the real directory.
        if batch_id is not None and len(standin.store.batch(batch_id)) >= BATCH_CAP:
            raise DirectoryError(400, {"detail": f"Batch cannot exceed {BATCH_CAP} hospitals"})
        hospital = await standin.commit_create(new)
    return json_answer(hospital.to_json())


async def list_hospitals(request: web.Request) -> web.Response:
    """`GET /hospitals/`: every hospital of every caller."""
    standin = request.app[STANDIN_KEY]
    async with standin.handling("list", request.remote):
        return json_answer([h.to_json() for h in standin.store.all()])


async def get_hospital(request: web.Request) -> web.Response:
    """`GET /hospitals/{hospital_id}`."""
    standin = request.app[STANDIN_KEY]
    hospital_id = _hospital_id(request)
    async with standin.handling("get", request.remote):
        return json_answer(_stored(standin.store, hospital_id).to_json())


async def update_hospital(request: web.Request) -> web.Response:
    """`PUT /hospitals/{hospital_id}`: partial update of name, address and phone."""
    standin = request.app[STANDIN_KEY]
    body = await read_body(request)
    errors: list[ErrorItem] = []
    # FastAPI reports path errors before body errors, in one 422.
    hospital_id = path_int(request, "hospital_id", errors)
    changes = hospital_changes(body, errors)
    if hospital_id is None or changes is None:
        raise ValidationFailed(errors)
    async with standin.handling("update", request.remote):
        hospital = _stored(standin.store, hospital_id)
        for field, value in changes.items():
            setattr(hospital, field, value)
        return json_answer(hospital.to_json())


async def delete_hospital(request: web.Request) -> web.Response:
    """`DELETE /hospitals/{hospital_id}`: 204 with an empty body."""
    standin = request.app[STANDIN_KEY]
    hospital_id = _hospital_id(request)
    async with standin.handling("delete", request.remote):
        if not standin.store.delete(hospital_id):
            raise not_found(HOSPITAL_NOT_FOUND)
        return web.Response(status=204)


async def get_batch(request: web.Request) -> web.Response:
    """`GET /hospitals/batch/{batch_id}`: the members, or 404 (never `[]`)."""
    standin = request.app[STANDIN_KEY]
    batch_id = _batch_id(request)
    async with standin.handling("batch_get", request.remote):
        return json_answer([h.to_json() for h in _members(standin.store, batch_id)])


async def activate_batch(request: web.Request) -> web.Response:
    """`PATCH /hospitals/batch/{batch_id}/activate`: refuses when any member is active."""
    standin = request.app[STANDIN_KEY]
    batch_id = _batch_id(request)
    async with standin.handling("batch_activate", request.remote):
        members = _members(standin.store, batch_id)
        # Not idempotent: a second activation, or one after new members joined, fails.
        if any(h.active for h in members):
            detail = "Cannot activate batch: one or more hospitals in the batch are already active"
            raise DirectoryError(400, {"detail": detail})
        for hospital in members:
            hospital.active = True
        count = len(members)
        message = f"Activated {count} hospital(s) with batch ID {batch_id}"
        return json_answer({"activated_count": count, "message": message})


async def delete_batch(request: web.Request) -> web.Response:
    """`DELETE /hospitals/batch/{batch_id}`."""
    standin = request.app[STANDIN_KEY]
    batch_id = _batch_id(request)
    async with standin.handling("batch_delete", request.remote):
        count = standin.store.delete_batch(batch_id)
        if not count:
            raise not_found(BATCH_NOT_FOUND)
        message = f"Deleted {count} hospital(s) with batch ID {batch_id}"
        return json_answer({"deleted_count": count, "message": message})


def add_directory_routes(router: web.UrlDispatcher) -> None:
    """Register the directory's routes, each named by its endpoint key."""
    hospital = "/hospitals/{hospital_id}"
    batch = "/hospitals/batch/{batch_id}"
    # FastAPI adds no HEAD to GET routes: HEAD answers 405 there.
    router.add_route("GET", "/", root, name="root")
    router.add_route("POST", "/hospitals/", create_hospital, name="create")
    router.add_route("GET", "/hospitals/", list_hospitals, name="list")
    router.add_route("GET", hospital, get_hospital, name="get")
    router.add_route("PUT", hospital, update_hospital, name="update")
    router.add_route("DELETE", hospital, delete_hospital, name="delete")
    router.add_route("GET", batch, get_batch, name="batch_get")
    router.add_route("DELETE", batch, delete_batch, name="batch_delete")
    router.add_route("PATCH", f"{batch}/activate", activate_batch, name="batch_activate")


def _hospital_id(request: web.Request) -> int:
    errors: list[ErrorItem] = []
    hospital_id = path_int(request, "hospital_id", errors)
    if hospital_id is None:
        raise ValidationFailed(errors)
    return hospital_id


def _batch_id(request: web.Request) -> str:
    errors: list[ErrorItem] = []
    batch_id = path_uuid(request, "batch_id", errors)
    if batch_id is None:
        raise ValidationFailed(errors)
    return batch_id


def _stored(store: HospitalStore, hospital_id: int) -> Hospital:
    hospital = store.get(hospital_id)
    if hospital is None:
        raise not_found(HOSPITAL_NOT_FOUND)
    return hospital


def _members(store: HospitalStore, batch_id: str) -> list[Hospital]:
    members = store.batch(batch_id)
    if not members:
        raise not_found(BATCH_NOT_FOUND)
    return members
