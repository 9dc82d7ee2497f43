"""Shared fixtures: a real redis-server started by the tests, queues on it, daemon processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from support import TEST_PLUGINS, Processes

from flowchat import Services
from flowchat.catalog import Catalog
from flowchat.keys import Keys
from flowchat.mover import DelayedMover
from flowchat.queue import Queue
from flowchat.redis_server import RedisServer, free_port
from flowchat.registry import Registry, load_registry
from flowchat.worker import Worker, WorkerSettings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (AOF on) for the session, on a free TCP port."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def queue(redis: Redis) -> Queue:
    q = Queue(redis, Keys("fc"))
    await q.setup()
    return q


@pytest.fixture(scope="session")
def registry() -> Registry:
    return load_registry(TEST_PLUGINS, entry_points=False)


@pytest.fixture
def flows_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "flows"
    folder.mkdir()
    return folder


@pytest.fixture
def catalog_factory(registry: Registry) -> Callable[[Path], Catalog]:
    def make(folder: Path) -> Catalog:
        catalog = Catalog(folder, registry)
        catalog.reload()
        return catalog

    return make


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


@pytest.fixture
async def start_worker(queue: Queue) -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[Worker, asyncio.Task[None]]] = []
    mover = asyncio.create_task(DelayedMover(queue, max_sleep=0.02).run())

    async def start(catalog: Catalog, **settings: Any) -> Worker:
        options = {"concurrency": 8, "visibility_timeout": 2.0, "block_ms": 50, "grace": 5.0, **settings}
        worker = Worker(queue, catalog, Services(), WorkerSettings(**options))
        started.append((worker, asyncio.create_task(worker.run())))
        return worker

    yield start
    for worker, task in started:
        worker.stop()
        await task
    mover.cancel()
    await asyncio.gather(mover, return_exceptions=True)
