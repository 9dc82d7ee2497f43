"""The CRM services' factories: ``contacts``, ``limiter`` and ``events`` (entry points ``flowchat.services``).

They use the runtime's Redis client (``services.redis``, the queue's). A process without one
(``flowchat run``) gets the configured Redis (``FLOWCHAT_REDIS_URL``, else the embedded
server): the first CRM service opens it and hands it on through ``services.redis``, so the
three share one connection, closed when the first of them closes (the last to close).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from redis.asyncio import Redis

from flowchat.contacts import Contacts
from flowchat.events import Events
from flowchat.keys import Keys
from flowchat.limiter import Limiter
from flowchat.settings import Settings


async def _redis(settings: Settings, services: Any) -> tuple[Redis, Keys, AsyncExitStack | None]:
    from flowchat.connections import open_redis, queue_keys

    keys = getattr(services, "keys", None) or queue_keys(settings)
    redis = getattr(services, "redis", None)
    if redis is not None:
        return redis, keys, None
    stack = AsyncExitStack()
    own: Redis = await stack.enter_async_context(open_redis(settings))
    if services is not None:
        services.redis, services.keys = own, keys  # the next CRM service shares this connection
    return own, keys, stack


async def open_events(settings: Settings, services: Any = None) -> Events:
    """Service ``events``: the analytics stream (writes nothing with FLOWCHAT_ANALYTICS=off)."""
    redis, keys, owned = await _redis(settings, services)
    events = Events(redis, keys, enabled=settings.analytics)
    events.owned = owned
    await events.setup()
    return events


async def open_contacts(settings: Settings, services: Any = None) -> Contacts:
    """Service ``contacts``: the contact book; its changes go to the ``events`` service if started."""
    extra = getattr(services, "extra", None)
    events = extra.get("events") if extra is not None else None
    started_events = events is None
    if events is None:  # started before ``events`` (entry points come in name order): start it now
        events = await open_events(settings, services)
        if extra is not None:
            extra["events"] = events  # the runtime then skips its own factory
    redis, keys, owned = await _redis(settings, services)
    book = Contacts(redis, keys, default_region=settings.default_region, events=events)
    book.owned = owned
    book.owns_events = started_events
    return book


async def open_limiter(settings: Settings, services: Any = None) -> Limiter:
    """Service ``limiter``: exact GCRA rate limits."""
    redis, keys, owned = await _redis(settings, services)
    limiter = Limiter(redis, keys)
    limiter.owned = owned
    return limiter
