"""Shared fixtures: a real redis-server started by the tests, queues on it, daemon processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from engine.catalog import Catalog
from engine.keys import Keys
from engine.queue import Queue
from engine.redis_server import RedisServer, free_port
from engine.registry import Registry, load_registry

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEST_PLUGINS = FIXTURES / "plugins"


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


def daemon_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLOWCHAT_")}
    env.update(
        FLOWCHAT_REDIS_URL=redis_url,
        FLOWCHAT_PLUGINS=str(TEST_PLUGINS),
        FLOWCHAT_VISIBILITY_TIMEOUT="1.5",
        FLOWCHAT_GRACE="10",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Processes:
    """Start flowchat processes; stop (SIGTERM, then SIGKILL) whatever is left at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str], ready: str = "flowchat:") -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"proc-{len(self.running)}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log
        )
        self.running.append(process)
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        if ready not in line:
            process.kill()
            raise AssertionError(f"{args} did not start: {line!r}\n{self.log_of(process)}")
        return process

    def log_of(self, process: subprocess.Popen[bytes]) -> str:
        index = self.running.index(process)
        return (self.tmp_path / f"proc-{index}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


async def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.02) -> None:
    """Poll an (async or sync) predicate until it is truthy."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        await asyncio.sleep(interval)
