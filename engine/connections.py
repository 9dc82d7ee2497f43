"""Redis connections: the one place a FlowChat process opens its Redis client.

Four ways to reach Redis, chosen by :class:`~flowchat.settings.Settings`:

- **Sentinel** (``FLOWCHAT_REDIS_SENTINELS`` + ``FLOWCHAT_REDIS_SENTINEL_MASTER``): the
  sentinels name the current master; after a failover the client asks them again.
- **Cluster** (``FLOWCHAT_REDIS_URL`` at any node of a Redis Cluster): detected from the
  server's ``INFO cluster``, or forced with ``FLOWCHAT_REDIS_CLUSTER=1``. Every key of one
  queue shares a hash tag, so one queue (one ``FLOWCHAT_QUEUE`` partition) lives in one slot.
- **Single** (``FLOWCHAT_REDIS_URL``): ``redis://``, ``rediss://`` or ``unix://``.
- **Embedded** (none of the above): a private ``redis-server`` with AOF in
  ``FLOWCHAT_DATA_DIR``, started for this process and stopped when it ends.

A Cluster client is a :class:`redis.asyncio.cluster.RedisCluster`; the rest of the engine
uses only the commands both clients share (and :class:`~flowchat.pipeliner.Pipeliner`
groups raw commands by node), so it is handed around typed as :class:`Redis`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisError

from flowchat.keys import Keys
from flowchat.queue import Queue, Retention
from flowchat.redis_server import RedisServer
from flowchat.settings import Settings

log = logging.getLogger("flowchat.connections")

MODES = ("embedded", "single", "cluster", "sentinel")


@dataclass(frozen=True)
class Target:
    """Which Redis a process uses, for the start-up line: never the password."""

    mode: str
    where: str

    def __str__(self) -> str:
        return f"{self.where} ({self.mode})"


def _options(url: str = "") -> dict[str, Any]:
    """Client options that notice a dead connection: no call waits on a half-open socket for long.

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
    return options


def redis_client(url: str) -> Redis:
    """A single-server client for ``url`` (see :func:`_options`)."""
    client: Redis = Redis.from_url(url, **_options(url))  # redis-py leaves from_url's return unannotated
    return client


def cluster_client(url: str) -> Redis:
    """A Redis Cluster client starting from any node's ``url`` (typed as :class:`Redis`, see module doc)."""
    return cast(Redis, RedisCluster.from_url(url, **_options(url)))


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


async def cluster_enabled(url: str) -> bool:
    """Ask the server at ``url`` whether it is a Cluster node (``INFO cluster``)."""
    probe = redis_client(url)
    try:
        info = await probe.info("cluster")
        return bool(int(info.get("cluster_enabled", 0)))
    finally:
        await probe.aclose()


async def _detect_cluster(url: str) -> bool:
    """Cluster or not, from the server; an unreachable server is taken as a single one (said once)."""
    try:
        return await cluster_enabled(url)
    except (RedisError, OSError) as exc:
        log.warning(
            "cannot reach %s to see whether it is a Redis Cluster (%s); using it as a single server "
            "(set FLOWCHAT_REDIS_CLUSTER=1 if it is a Cluster)",
            describe_url(url),
            exc,
        )
        return False


def sentinel_client(settings: Settings) -> tuple[Redis, Sentinel]:
    """The master named ``FLOWCHAT_REDIS_SENTINEL_MASTER``, found through the sentinels."""
    tls: dict[str, Any] = {"ssl": True} if settings.redis_tls else {}
    if settings.redis_tls and settings.redis_tls_ca_file:
        tls["ssl_ca_certs"] = settings.redis_tls_ca_file
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": 2, **tls}
    if settings.redis_sentinel_password:
        sentinel_kwargs["password"] = settings.redis_sentinel_password
    options = {**_options(), **tls}
    if settings.redis_password:
        options["password"] = settings.redis_password
    sentinel = Sentinel(list(settings.redis_sentinels), sentinel_kwargs=sentinel_kwargs, **options)
    return sentinel.master_for(settings.redis_sentinel_master), sentinel


def describe(settings: Settings, redis: Any) -> Target:
    """Host and mode of ``redis`` as configured by ``settings`` (no password)."""
    if settings.redis_sentinels:
        where = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        return Target("sentinel", f"master {settings.redis_sentinel_master} via {where}")
    if not settings.redis_url:
        return Target("embedded", str(settings.data_dir))
    return Target("cluster" if is_cluster(redis) else "single", describe_url(settings.redis_url))


def describe_url(url: str) -> str:
    """``redis://host:port`` of a URL, without user or password."""
    parts = urlsplit(url)
    return parts.path if parts.scheme == "unix" else f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"


def is_sentinel(redis: Any) -> bool:
    return isinstance(getattr(redis, "connection_pool", None), SentinelConnectionPool)


@contextlib.asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[Redis]:
    """The configured Redis (Sentinel, Cluster or URL), else a private embedded server; closed on exit."""
    embedded: RedisServer | None = None
    sentinel: Sentinel | None = None
    url = settings.redis_url
    if settings.redis_sentinels:
        redis, sentinel = sentinel_client(settings)
    else:
        if not url:
            embedded = RedisServer(settings.data_dir).start()
            url = embedded.url
            log.info("embedded redis-server with AOF in %s", embedded.data_dir)
        cluster = settings.redis_cluster
        if cluster is None and not embedded:
            cluster = await _detect_cluster(url)
        redis = cluster_client(url) if cluster else redis_client(url)
        if cluster:
            await cast(RedisCluster, redis).initialize()
    try:
        yield redis
    finally:
        await redis.aclose()
        if sentinel is not None:
            for client in sentinel.sentinels:
                await client.aclose()
        if embedded is not None:
            embedded.stop()


def retention(settings: Settings) -> Retention:
    """``FLOWCHAT_RETENTION_SUCCEEDED``, ``_FAILED``, ``FLOWCHAT_DEDUPE_TTL`` and ``FLOWCHAT_COMPACT_SUCCEEDED``."""
    return Retention(
        settings.retention_succeeded, settings.retention_failed, settings.dedupe_ttl, settings.compact_succeeded
    )


def queue_keys(settings: Settings) -> Keys:
    """The key names of the configured queue (``FLOWCHAT_QUEUE``)."""
    return Keys(settings.queue)


@contextlib.asynccontextmanager
async def open_queue(settings: Settings) -> AsyncIterator[Queue]:
    """A set-up :class:`Queue` on the configured Redis (operator commands, tools)."""
    async with open_redis(settings) as redis:
        queue = Queue(redis, queue_keys(settings), retention=retention(settings))
        await queue.setup()
        yield queue
