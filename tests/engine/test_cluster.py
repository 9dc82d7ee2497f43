"""FlowChat on a real 3-master Redis Cluster: ingress and two worker processes, exactly once.

The cluster is three ``redis-server --cluster-enabled yes`` processes joined with
``redis-cli --cluster create``; FlowChat is pointed at one node and detects the rest.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Awaitable, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis as sync_redis
from support import ROOT, TEST_PLUGINS, daemon_env, lines, mark_node, run_cli, wait_for, write_flow

from flowchat.connections import open_queue
from flowchat.keys import Keys
from flowchat.loader import load_flow
from flowchat.local_redis import LocalCluster
from flowchat.redis_server import free_port
from flowchat.registry import load_registry
from flowchat.settings import Settings


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    servers = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield servers
    servers.stop()


async def post(http: aiohttp.ClientSession, port: int, path: str, key: str | None = None) -> dict[str, object]:
    headers = {"Idempotency-Key": key} if key else {}
    async with http.post(f"http://127.0.0.1:{port}/hooks/{path}", json={"n": 1}, headers=headers) as response:
        assert response.status in (200, 202), await response.text()
        return dict(json.loads(await response.text()))


async def test_ingress_and_two_workers_run_every_execution_once_on_a_cluster(cluster, flows_dir, processes, tmp_path):
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    write_flow(flows_dir, "plain", [mark_node(marks, "a")])
    retry = {"max_attempts": 20, "backoff": "200ms", "max_backoff": "300ms"}
    flaky = {"id": "gate", "type": "test.fail_until", "retry": retry, "with": {"exists": str(gate)}}
    write_flow(flows_dir, "flaky", [flaky, mark_node(marks, "b")])
    write_flow(flows_dir, "later", [{"id": "wait", "type": "delay", "with": {"for": "1s"}}, mark_node(marks, "c")])
    env = daemon_env(cluster.url)
    port = free_port()
    serve = processes.start("serve", "--no-workers", "--port", str(port), "--flows", str(flows_dir), env=env)
    workers = [processes.start("worker", "--flows", str(flows_dir), env=env) for _ in range(2)]

    async with aiohttp.ClientSession() as http:
        plain = await asyncio.gather(*(post(http, port, "plain") for _ in range(60)))
        flaky = await asyncio.gather(*(post(http, port, "flaky") for _ in range(10)))
        later = await asyncio.gather(*(post(http, port, "later") for _ in range(10)))
        repeats = [await post(http, port, "plain", key=f"k{i % 5}") for i in range(15)]
        await asyncio.sleep(0.5)
        gate.touch()  # the flaky ones have retried through the delayed set by now

    deduped = {str(reply["execution_id"]) for reply in repeats}
    assert len(deduped) == 5  # one execution per idempotency key, across the cluster
    expected = {str(r["execution_id"]): node for rows, node in ((plain, "a"), (flaky, "b"), (later, "c")) for r in rows}
    expected.update(dict.fromkeys(deduped, "a"))

    def finished() -> Counter[str]:
        return Counter(line.split()[0] for line in lines(marks) if line.split()[2] == "done")

    await wait_for(lambda: set(finished()) >= set(expected), timeout=60)
    await asyncio.sleep(0.5)  # nothing runs a second time afterwards
    done = finished()
    assert set(done) == set(expected)
    assert all(count == 1 for count in done.values()), [e for e, count in done.items() if count > 1]
    pids = {line.split()[3] for line in lines(marks)}
    assert pids <= {str(w.pid) for w in workers} and len(pids) == 2  # both workers took part

    # the CRM, WhatsApp (outbox) and analytics parts, each under its own hash tag, on the cluster too
    crm = await run_the_crm_example(cluster.url, flows_dir)
    assert crm == ["succeeded"] * len(crm), crm

    result = run_cli("queue", "stats", "--json", env=env)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["ready"] == 0 and stats["dead"] == 0
    assert stats["flows"]["crm"]["succeeded"] == len(crm)
    assert "cluster" in processes.log_of(serve)
    for process in (serve, *workers):
        log = processes.log_of(process)
        assert "CROSSSLOT" not in log and "Traceback" not in log, log
    assert serve.poll() is None and all(w.poll() is None for w in workers)


async def run_the_crm_example(url: str, flows_dir: Path) -> list[str]:
    """examples/crm.yaml (contacts, tags, rate limit, WhatsApp outbox send, metric) for five contacts."""
    shutil.copy(ROOT / "examples" / "crm.yaml", flows_dir / "crm.yaml")
    await asyncio.sleep(1.5)  # the workers' flow watchers pick the file up
    flow = load_flow(flows_dir / "crm.yaml", load_registry(TEST_PLUGINS))
    trigger = json.loads((ROOT / "examples" / "crm.input.json").read_text())
    async with open_queue(Settings.from_env({"FLOWCHAT_REDIS_URL": url})) as queue:
        await queue.store_flow(flow)
        ids = []
        for n in range(5):
            phone = f"+55119876543{n:02d}"
            payload = {**trigger, "From": f"whatsapp:{phone}", "MessageSid": f"SM{n:032d}"}
            payload["contact"] = {**trigger["contact"], "phone": phone}
            ids.append((await queue.enqueue(flow.name, flow.version, payload))[0])

        async def statuses() -> list[str]:
            found = []
            for execution_id in ids:
                stored = await queue.get(execution_id)
                found.append(stored[0]["status"] if stored else "missing")
            return found

        await wait_for(lambda: _settled(statuses()), timeout=60)
        return await statuses()


async def _settled(statuses: Awaitable[list[str]]) -> bool:
    return all(status in ("succeeded", "failed") for status in await statuses)


async def test_every_key_of_a_queue_and_of_each_feature_stays_in_its_slot(cluster):
    """Multi-key scripts touch one slot: each feature's keys share one hash tag."""
    keys = Keys("fc")
    client = sync_redis.RedisCluster.from_url(cluster.url)
    try:
        queue_keys = [keys.ready, keys.delayed, keys.dead, keys.index("f", "queued"), keys.indexed_flows]
        queue_keys += [keys.counters, keys.execution("x")]
        queue_keys += [keys.dedupe("d"), keys.flow_source("f", "v"), keys.schedule_last("f")]
        assert len({client.keyslot(key) for key in queue_keys}) == 1
        ledger = [keys.message("SM1"), keys.messages, keys.send_record("x", "n")]
        assert len({client.keyslot(key) for key in ledger}) == 1
    finally:
        client.close()


async def test_two_partitions_land_on_different_slots_and_both_work(cluster):
    """One hash tag per FLOWCHAT_QUEUE: partitions spread over the cluster's masters."""
    client = sync_redis.RedisCluster.from_url(cluster.url)
    owner = {name: client.get_node_from_key(Keys(name).ready).name for name in (f"fc{i}" for i in range(1, 20))}
    client.close()
    first = "fc1"
    second = next(name for name, node in owner.items() if node != owner[first])
    names = [first, second]  # two masters, each running one partition
    for name in names:
        settings = Settings.from_env({"FLOWCHAT_REDIS_URL": cluster.url, "FLOWCHAT_QUEUE": name})
        async with open_queue(settings) as queue:
            execution_id, created = await queue.enqueue("f", "v1", {}, idempotency_key="same")
            assert created
            [delivery] = await queue.read("c", 10, 10)
            assert delivery.execution_id == execution_id


async def test_cluster_mode_can_be_forced_and_is_named(cluster):
    settings = Settings.from_env({"FLOWCHAT_REDIS_URL": cluster.url, "FLOWCHAT_REDIS_CLUSTER": "1"})
    async with open_queue(settings) as queue:
        from flowchat.connections import describe

        assert describe(settings, queue.redis).mode == "cluster"
        assert (await queue.stats())["dead"] >= 0


def test_queue_stats_works_through_the_cli_on_a_cluster(cluster):
    result = run_cli("queue", "stats", env=daemon_env(cluster.url))
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stdout


async def test_list_running_reads_the_pending_list_on_a_cluster(cluster):
    from flowchat.operations import list_executions

    settings = Settings.from_env({"FLOWCHAT_REDIS_URL": cluster.url, "FLOWCHAT_QUEUE": "running"})
    async with open_queue(settings) as queue:
        execution_id, _ = await queue.enqueue("f", "v1", {})
        [delivery] = await queue.read("c", 10, 10)
        assert delivery.execution_id == execution_id
        rows = await list_executions(queue, "f", "running", 10)
        assert [(row["id"], row["status"]) for row in rows] == [(execution_id, "running")]
