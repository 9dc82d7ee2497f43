"""`python -m bench --cluster`: queue throughput on a local 3-master Redis Cluster, 1 and 2 partitions.

A partition is one ``FLOWCHAT_QUEUE`` name: all its keys share one hash tag, so one
partition lives on one master. Both rows run two worker processes; with two
partitions each worker has a queue (and a master) of its own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis as sync_redis

from bench.stored import indexed_ids, summaries
from flowchat.connections import open_redis
from flowchat.keys import Keys
from flowchat.loader import load_flow
from flowchat.local_redis import LocalCluster
from flowchat.queue import Queue
from flowchat.registry import load_registry
from flowchat.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def partitions_on_distinct_masters(client: sync_redis.RedisCluster, count: int) -> list[str]:
    """``count`` queue names whose hash tags live on different masters (``fc``, ``fc1``, ...)."""
    chosen: dict[str, str] = {}
    for name in ["fc", *(f"fc{i}" for i in range(1, 200))]:
        node = client.get_node_from_key(Keys(name).ready).name
        if node not in chosen:
            chosen[node] = name
        if len(chosen) == count:
            return list(chosen.values())
    raise RuntimeError("not enough masters for the partitions asked for")


async def _enqueue(url: str, flow_file: Path, names: list[str], count: int) -> None:
    flow = load_flow(flow_file, load_registry(entry_points=False))
    trigger = {"phone": "+14155550123", "name": "Ada Lovelace", "source": "web"}
    async with open_redis(Settings.from_env({"FLOWCHAT_REDIS_URL": url})) as redis:
        for index, name in enumerate(names):
            queue = Queue(redis, Keys(name))
            await queue.setup()
            await queue.store_flow(flow)
            share = count // len(names) + (1 if index < count % len(names) else 0)
            for start in range(0, share, 1000):
                await queue.enqueue_many(
                    flow.name, flow.version, [{**trigger, "n": n} for n in range(start, min(share, start + 1000))]
                )


def _finished(client: sync_redis.RedisCluster, names: list[str], flow: str) -> int:
    return sum(int(client.hget(Keys(name).counters, f"succeeded:{flow}") or 0) for name in names)


def _span(client: sync_redis.RedisCluster, names: list[str]) -> tuple[float, float]:
    first, last = float("inf"), 0.0
    for name in names:
        keys = Keys(name)
        for state in summaries(client, keys, indexed_ids(client, keys)):
            first, last = min(first, state["started_at"] or first), max(last, state["finished_at"] or last)
    return first, last


def drain(
    cluster: LocalCluster, flows: Path, flow: str, partitions: int, count: int, workers: int = 2
) -> dict[str, Any]:
    client = sync_redis.RedisCluster.from_url(cluster.url)
    client.flushall()
    names = partitions_on_distinct_masters(client, partitions)
    asyncio.run(_enqueue(cluster.url, flows / f"{flow}.yaml", names, count))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.worker_proc", cluster.url, str(flows), "64", names[i % len(names)]],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i in range(workers)
    ]
    for proc in procs:
        assert proc.stdout is not None and "ready" in proc.stdout.readline()
    deadline = time.time() + 300
    while _finished(client, names, flow) < count and time.time() < deadline:
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    started, finished = _span(client, names)
    client.close()
    return {
        "partitions": partitions,
        "queues": names,
        "workers": workers,
        "executions": count,
        "executions_per_s": count / (finished - started),
    }


def run(workdir: Path, flows: Path, count: int) -> dict[str, Any]:
    """Start a local cluster, drain ``count`` executions with 1 then 2 partitions."""
    cluster = LocalCluster(workdir / "cluster").start()
    try:
        return {f"partitions_{p}": drain(cluster, flows, "noop1", p, count) for p in (1, 2)}
    finally:
        cluster.stop()


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    one, two = results["partitions_1"], results["partitions_2"]
    return [
        ("cluster: 1 partition, 2 workers", f"{one['executions_per_s']:,.0f} exec/s", "3 masters", ""),
        (
            "cluster: 2 partitions, 2 workers",
            f"{two['executions_per_s']:,.0f} exec/s",
            f"{two['executions_per_s'] / one['executions_per_s']:.2f}x 1 partition",
            "",
        ),
    ]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        flows_dir = Path(folder) / "flows"
        flows_dir.mkdir()
        (flows_dir / "noop1.yaml").write_text(
            "flow: noop1\ntrigger: {type: webhook, path: noop1}\nnodes:\n  - {id: n0, type: set, with: {values: {}}}\n"
        )
        print(json.dumps(run(Path(folder), flows_dir, int(sys.argv[1]) if len(sys.argv) > 1 else 5000), indent=2))
