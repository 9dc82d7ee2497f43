"""Real processes, real failures: kill workers, restart and stop Redis, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from support import daemon_env, mark_node, wait_for, write_flow

from flowchat.keys import Keys
from flowchat.queue import Queue
from flowchat.redis_server import RedisServer, free_port


def mark_flow(folder: Path, name: str, marks: Path, *more: dict[str, Any]) -> None:
    """A flow whose first node marks ``marks``, then the ``more`` nodes."""
    write_flow(folder, name, [mark_node(marks, "first"), *more])


def starts(marks: Path) -> Counter[tuple[str, str]]:
    text = marks.read_text() if marks.exists() else ""
    return Counter(
        (parts[0], parts[1]) for parts in (line.split() for line in text.splitlines()) if parts[2] == "start"
    )


async def counter(queue: Queue, name: str) -> int:
    value = await queue.redis.hget(queue.keys.counters, name)
    return int(value or 0)


async def enqueue_many(queue: Queue, flow_file: Path, count: int) -> list[str]:
    from flowchat.loader import load_flow
    from flowchat.registry import load_registry

    flow = load_flow(
        flow_file, load_registry(Path(__file__).parent.parent / "fixtures" / "plugins", entry_points=False)
    )
    await queue.store_flow(flow)
    return await queue.enqueue_many(flow.name, flow.version, [{"n": n} for n in range(count)])


async def test_two_worker_processes_drain_2000_executions_each_exactly_once(
    queue, redis_url, flows_dir, processes, tmp_path
):
    marks = tmp_path / "marks"
    mark_flow(flows_dir, "bulk", marks)
    env = daemon_env(redis_url)
    first = processes.start("worker", "--flows", str(flows_dir), "--concurrency", "16", env=env)
    second = processes.start("worker", "--flows", str(flows_dir), "--concurrency", "16", env=env)
    ids = await enqueue_many(queue, flows_dir / "bulk.yaml", 2000)

    async def all_done() -> bool:
        return await counter(queue, "succeeded:bulk") >= 2000

    await wait_for(all_done, timeout=120, interval=0.1)
    ran = starts(marks)
    assert sorted(execution for execution, _ in ran) == sorted(ids)
    assert set(ran.values()) == {1}
    pids = {line.split()[3] for line in marks.read_text().splitlines()}
    assert pids == {str(first.pid), str(second.pid)}  # both took a share
    stats = await queue.stats()
    assert (stats["ready"], stats["in_flight"], stats["dead"]) == (0, 0, 0)


async def test_a_killed_worker_s_execution_is_finished_by_another_without_rerunning_finished_nodes(
    queue, redis_url, flows_dir, processes, tmp_path
):
    marks = tmp_path / "marks"
    slow = mark_node(marks, "slow", sleep=30, sleep_first_run_only=True) | {"timeout": "60s"}
    mark_flow(flows_dir, "crashy", marks, slow, mark_node(marks, "last"))
    env = daemon_env(redis_url, FLOWCHAT_VISIBILITY_TIMEOUT="1")
    victim = processes.start("worker", "--flows", str(flows_dir), env=env)
    [execution_id] = await enqueue_many(queue, flows_dir / "crashy.yaml", 1)

    await wait_for(lambda: starts(marks)[(execution_id, "slow")] == 1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    processes.start("worker", "--flows", str(flows_dir), env=env)

    async def succeeded() -> bool:
        stored = await queue.get(execution_id)
        return stored is not None and stored[0]["status"] == "succeeded"

    await wait_for(succeeded, timeout=30)
    ran = starts(marks)
    assert ran[(execution_id, "first")] == 1  # finished before the kill: not run again
    assert ran[(execution_id, "slow")] == 2  # interrupted mid-node: resumed
    assert ran[(execution_id, "last")] == 1


@pytest.fixture
def private_redis(tmp_path: Path):
    server = RedisServer(tmp_path / "redis", port=free_port()).start()
    yield server
    server.stop()


async def test_queued_and_delayed_executions_survive_a_redis_restart(private_redis, flows_dir, processes, tmp_path):
    marks = tmp_path / "marks"
    mark_flow(flows_dir, "durable", marks, {"id": "wait", "type": "delay", "with": {"for": "1s"}})
    client = Redis.from_url(private_redis.url)
    queue = Queue(client, Keys())
    await queue.setup()
    ids = await enqueue_many(queue, flows_dir / "durable.yaml", 40)
    env = daemon_env(private_redis.url)
    processes.start("worker", "--flows", str(flows_dir), env=env)

    async def some_parked() -> bool:
        return await client.zcard(queue.keys.delayed) > 0

    await wait_for(some_parked)
    await client.aclose()
    private_redis.stop()  # SIGTERM: AOF flushed, everything accepted is on disk
    private_redis.start()
    client = Redis.from_url(private_redis.url)
    queue = Queue(client, Keys())

    async def all_done() -> bool:
        return await counter(queue, "succeeded:durable") == 40

    await wait_for(all_done, timeout=60, interval=0.1)
    assert sorted(e for e, node in starts(marks) if node == "first") == sorted(ids)
    await client.aclose()


async def test_ingress_answers_503_while_redis_is_down_and_everything_accepted_completes(
    private_redis, flows_dir, processes, tmp_path
):
    marks = tmp_path / "marks"
    mark_flow(flows_dir, "hooked", marks)
    port = free_port()
    env = daemon_env(private_redis.url)
    processes.start("serve", "--flows", str(flows_dir), "--port", str(port), env=env)
    url = f"http://127.0.0.1:{port}/hooks/hooked"
    accepted: list[str] = []

    async with aiohttp.ClientSession() as http:

        async def post(n: int) -> int:
            async with http.post(url, json={"n": n}) as response:
                body: dict[str, Any] = json.loads(await response.text())
                if response.status == 202:
                    accepted.append(body["execution_id"])
                return response.status

        assert [await post(n) for n in range(5)] == [202] * 5
        private_redis.stop()
        assert {await post(n) for n in range(5, 8)} == {503}
        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
            assert response.status == 503
        private_redis.start()

        async def accepting() -> bool:
            return await post(100) == 202

        await wait_for(accepting, timeout=30, interval=0.1)

    client = Redis.from_url(private_redis.url)
    queue = Queue(client, Keys())

    async def all_done() -> bool:
        return await counter(queue, "succeeded:hooked") == len(accepted)

    await wait_for(all_done, timeout=30)
    assert sorted(e for e, _ in starts(marks)) == sorted(accepted)
    await client.aclose()


async def test_sigterm_drains_in_flight_work_and_exits_zero(queue, redis_url, flows_dir, processes, tmp_path):
    marks = tmp_path / "marks"
    mark_flow(flows_dir, "draining", marks, mark_node(marks, "slow", sleep=1.5))
    worker = processes.start("worker", "--flows", str(flows_dir), env=daemon_env(redis_url))
    [execution_id] = await enqueue_many(queue, flows_dir / "draining.yaml", 1)
    await wait_for(lambda: starts(marks)[(execution_id, "slow")] == 1)

    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 15) == 0

    stored = await queue.get(execution_id)
    assert stored is not None and stored[0]["status"] == "succeeded"
    assert (await queue.stats())["in_flight"] == 0


async def test_work_left_after_the_grace_period_is_taken_over_not_lost(queue, redis_url, flows_dir, processes, tmp_path):
    marks = tmp_path / "marks"
    slow = mark_node(marks, "slow", sleep=30, sleep_first_run_only=True) | {"timeout": "60s"}
    mark_flow(flows_dir, "overdue", marks, slow)
    env = daemon_env(redis_url, FLOWCHAT_GRACE="0.3", FLOWCHAT_VISIBILITY_TIMEOUT="1")
    leaving = processes.start("worker", "--flows", str(flows_dir), env=env)
    [execution_id] = await enqueue_many(queue, flows_dir / "overdue.yaml", 1)
    await wait_for(lambda: starts(marks)[(execution_id, "slow")] == 1)

    leaving.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(leaving.wait, 15) == 0
    processes.start("worker", "--flows", str(flows_dir), env=env)

    async def succeeded() -> bool:
        stored = await queue.get(execution_id)
        return stored is not None and stored[0]["status"] == "succeeded"

    await wait_for(succeeded, timeout=30)
    assert starts(marks)[(execution_id, "first")] == 1
    assert starts(marks)[(execution_id, "slow")] == 2


async def test_draining_keeps_leases_so_no_other_worker_runs_the_same_work(queue, redis_url, flows_dir, processes, tmp_path):
    marks = tmp_path / "marks"
    mark_flow(flows_dir, "held", marks, mark_node(marks, "slow", sleep=3))
    env = daemon_env(redis_url, FLOWCHAT_GRACE="10", FLOWCHAT_VISIBILITY_TIMEOUT="1")
    draining = processes.start("worker", "--flows", str(flows_dir), env=env)
    [execution_id] = await enqueue_many(queue, flows_dir / "held.yaml", 1)
    await wait_for(lambda: starts(marks)[(execution_id, "slow")] == 1)
    processes.start("worker", "--flows", str(flows_dir), env=env)  # would take over an unrenewed lease

    draining.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(draining.wait, 15) == 0

    stored = await queue.get(execution_id)
    assert stored is not None and stored[0]["status"] == "succeeded"
    assert starts(marks)[(execution_id, "slow")] == 1
