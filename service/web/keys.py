"""Typed application state."""

from __future__ import annotations

import asyncio
import uuid
import weakref

from aiohttp import web

from service.processing.directory_client import DirectoryClient
from service.processing.processor import Processor
from service.settings import Settings
from service.store.event_store import EventStore
from service.web.feeds import Feeds
from service.web.status_cache import StatusCache

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", EventStore)
CLIENT = web.AppKey("directory_client", DirectoryClient)
PROCESSOR = web.AppKey("processor", Processor)
STARTED_AT = web.AppKey("started_at", float)
STATUS_CACHE = web.AppKey("status_cache", StatusCache)
FEEDS = web.AppKey("feeds", Feeds)
CPU_WORK = web.AppKey("cpu_work", asyncio.Lock)  # one CPU-bound job off the loop at a time
INTAKE = web.AppKey("intake", asyncio.Semaphore)  # uploads read and checked at once
STOPPING = web.AppKey("stopping", asyncio.Event)  # set as shutdown starts
KEY_NAMESPACE = web.AppKey("key_namespace", uuid.UUID)  # for batch ids from Idempotency-Keys
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("websockets")
