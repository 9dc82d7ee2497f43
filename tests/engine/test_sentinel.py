"""FlowChat on Redis with Sentinel: a master, a replica, three sentinels and a failover mid-run."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest
from support import daemon_env, lines, mark_node, wait_for, write_flow

from flowchat.connections import describe, open_queue
from flowchat.local_redis import LocalSentinel
from flowchat.redis_server import free_port
from flowchat.settings import Settings


@pytest.fixture
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSentinel]:
    servers = LocalSentinel(tmp_path_factory.mktemp("sentinel")).start()
    yield servers
    servers.stop()


def sentinel_env(servers: LocalSentinel) -> dict[str, str]:
    env = daemon_env("")
    del env["FLOWCHAT_REDIS_URL"]
    env.update(FLOWCHAT_REDIS_SENTINELS=servers.sentinels, FLOWCHAT_REDIS_SENTINEL_MASTER=servers.master_name)
    return env


async def accept(http: aiohttp.ClientSession, port: int) -> str:
    """POST until accepted: during a failover ingress answers 503 and a client tries again."""
    for _ in range(200):
        try:
            async with http.post(f"http://127.0.0.1:{port}/hooks/plain", json={}) as response:
                if response.status in (200, 202):
                    return str(json.loads(await response.text())["execution_id"])
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("ingress never accepted the request")


async def test_executions_before_and_after_a_failover_all_complete(sentinel, flows_dir, processes, tmp_path):
    marks = tmp_path / "marks"
    wait = {"id": "wait", "type": "delay", "with": {"for": "1s"}}
    write_flow(flows_dir, "plain", [mark_node(marks, "a"), wait, mark_node(marks, "b")])
    env = sentinel_env(sentinel)
    port = free_port()
    serve = processes.start("serve", "--port", str(port), "--flows", str(flows_dir), env=env)
    worker = processes.start("worker", "--flows", str(flows_dir), env=env)

    def finished(node: str = "b") -> Counter[str]:
        return Counter(line.split()[0] for line in lines(marks) if line.split()[1:3] == [node, "done"])

    async with aiohttp.ClientSession() as http:
        before = [await accept(http, port) for _ in range(20)]
        await wait_for(lambda: set(finished("a")) >= set(before), timeout=30)
        old = sentinel.master_port()  # the executions wait in the delayed set while the master changes
        new = await asyncio.to_thread(sentinel.failover)
        assert new != old
        after = [await accept(http, port) for _ in range(20)]

    await wait_for(lambda: set(finished()) >= set(before + after), timeout=60)
    done = finished()
    assert set(done) == set(before + after)
    assert all(count == 1 for count in done.values())
    assert "sentinel" in processes.log_of(serve)
    assert serve.poll() is None and worker.poll() is None


async def test_the_sentinel_client_follows_the_master_and_says_so(sentinel):
    settings = Settings.from_env(
        {"FLOWCHAT_REDIS_SENTINELS": sentinel.sentinels, "FLOWCHAT_REDIS_SENTINEL_MASTER": sentinel.master_name}
    )
    async with open_queue(settings) as queue:
        target = describe(settings, queue.redis)
        assert target.mode == "sentinel" and sentinel.master_name in str(target)
        execution_id, _ = await queue.enqueue("f", "v1", {})
        await asyncio.to_thread(sentinel.failover)
        for _ in range(100):  # the first command after the switch may fail; the next finds the new master
            try:
                await queue.enqueue("f", "v1", {})
                break
            except Exception:
                await asyncio.sleep(0.1)
        assert await queue.get(execution_id) is not None  # the replica had it: a planned failover loses nothing
