"""Redis connections: the one place a FlowChat process opens its Redis client.

Two ways to reach Redis today, chosen by :class:`~flowchat.settings.Settings`:

- **URL** (``FLOWCHAT_REDIS_URL``): ``redis://``, ``rediss://`` or ``unix://``.
- **Embedded** (no URL): a private ``redis-server`` with AOF in ``FLOWCHAT_DATA_DIR``,
  started for this process and stopped when it ends.

Cluster and Sentinel clients belong here too, beside these two, so every process
(daemon, worker, operator commands, benchmarks) opens Redis the same way.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis

from flowchat.keys import Keys
from flowchat.queue import Queue
from flowchat.redis_server import RedisServer
from flowchat.settings import Settings

log = logging.getLogger("flowchat.connections")


def redis_client(url: str) -> Redis:
    """A client for ``url`` that notices a dead connection: no call waits on a half-open socket for long.

    TCP keepalive probes find a dead peer in about 25 s without a timer per reply (the hot
    path's batches carry their own deadline in the Pipeliner).
    """
    options: dict[str, Any] = {"socket_connect_timeout": 2, "health_check_interval": 15}
    if not url.startswith("unix://"):
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = {
            socket.TCP_KEEPIDLE: 10,
            socket.TCP_KEEPINTVL: 5,
            socket.TCP_KEEPCNT: 3,
        }
    return Redis.from_url(url, **options)


@contextlib.asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[Redis]:
    """The configured Redis (``settings.redis_url``), else a private embedded server; closed on exit."""
    embedded: RedisServer | None = None
    url = settings.redis_url
    if not url:
        embedded = RedisServer(settings.data_dir).start()
        url = embedded.url
        log.info("embedded redis-server with AOF in %s", embedded.data_dir)
    redis = redis_client(url)
    try:
        yield redis
    finally:
        await redis.aclose()
        if embedded is not None:
            embedded.stop()


def queue_keys(settings: Settings) -> Keys:
    """The key names of the configured queue (``FLOWCHAT_QUEUE``)."""
    return Keys(settings.queue)


@contextlib.asynccontextmanager
async def open_queue(settings: Settings) -> AsyncIterator[Queue]:
    """A set-up :class:`Queue` on the configured Redis (operator commands, tools)."""
    async with open_redis(settings) as redis:
        queue = Queue(redis, queue_keys(settings))
        await queue.setup()
        yield queue
