"""`python -m bench [--quick]`: queue, ingress, latency and memory against same-run baselines.

Starts its own redis-server (AOF on, as the daemon runs it), prints a table and writes
the same numbers to bench/results/latest.json. Targets are printed beside each number;
missing one does not fail the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis as sync_redis
from redis.asyncio import Redis

from flowchat.keys import Keys
from flowchat.loader import load_flow
from flowchat.queue import Queue
from flowchat.redis_server import RedisServer, free_port
from flowchat.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
SECRET = "bench-secret"
SECRET_ENV = "FLOWCHAT_BENCH_SECRET"

NOOP_FLOW = """flow: {name}
trigger: {{type: webhook, path: {name}, secret_env: FLOWCHAT_BENCH_SECRET}}
nodes:
{nodes}
"""


def noop_nodes(count: int) -> str:
    return "\n".join(f"  - {{id: n{i}, type: set, with: {{values: {{}}}}}}" for i in range(count))


class Bench:
    def __init__(self, quick: bool, workdir: Path) -> None:
        self.quick = quick
        self.workdir = workdir
        self.server = RedisServer(workdir / "redis", port=free_port()).start()
        self.url = self.server.url
        self.flows = workdir / "flows"
        self.flows.mkdir()
        for name, count in (("noop1", 1), ("noop5", 5)):
            (self.flows / f"{name}.yaml").write_text(NOOP_FLOW.format(name=name, nodes=noop_nodes(count)))
        self.env = {**os.environ, "FLOWCHAT_REDIS_URL": self.url, SECRET_ENV: SECRET, "PYTHONUNBUFFERED": "1"}
        self.env.pop("FLOWCHAT_PLUGINS", None)
        self.results: dict[str, Any] = {}

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def flush(self) -> None:
        client = sync_redis.Redis.from_url(self.url)
        client.flushall()
        client.close()

    def close(self) -> None:
        self.server.stop()

    def spawn(self, *args: str, ready: str | None = None) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if ready is not None:
            assert process.stdout is not None
            line = process.stdout.readline()
            if ready not in line:
                process.kill()
                raise RuntimeError(f"{args} did not start: {line!r}")
        return process

    def serve(self, port: int, *options: str) -> subprocess.Popen[str]:
        """`flowchat serve` as an operator runs it, on the bench's flows and Redis."""
        args = ["-m", "flowchat.cli", "--log-level", "ERROR", "serve", "--flows", str(self.flows), "--port", str(port)]
        return self.spawn(*args, *options, ready="flowchat:")

    # --- baseline ----------------------------------------------------------------

    def baseline(self) -> None:
        self.flush()
        count = self.n(200_000, 30_000)
        sync_redis.Redis.from_url(self.url).xgroup_create("bench:baseline", "g", id="0", mkstream=True)
        consumer = self.spawn("-m", "bench.baseline", "consume", self.url, str(count))
        producer = self.spawn("-m", "bench.baseline", "produce", self.url, str(count))
        producer.wait()
        out, _ = consumer.communicate()
        consumed = json.loads(out)
        rate = count / (consumed["last_ack"] - consumed["first_read"])
        self.results["baseline"] = {"jobs": count, "jobs_per_s": rate}

    # --- queue -------------------------------------------------------------------

    def queue_drain(self, flow_name: str, workers: int = 1) -> dict[str, Any]:
        self.flush()
        count = self.n(50_000, 8_000)
        ids = asyncio.run(self._enqueue(flow_name, count))
        client = sync_redis.Redis.from_url(self.url)
        redis_cpu_before = self._redis_cpu(client)
        procs = [
            self.spawn("-m", "bench.worker_proc", self.url, str(self.flows), "64", ready="ready") for _ in range(workers)
        ]
        deadline = time.time() + 300
        while int(client.hget(Keys().counters, f"succeeded:{flow_name}") or 0) < count and time.time() < deadline:
            time.sleep(0.05)
        stats = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            stats.append(json.loads(out.strip().splitlines()[-1]))
        redis_cpu = self._redis_cpu(client) - redis_cpu_before
        started, finished = self._span(client, ids)
        return {
            "workers": workers,
            "executions": count,
            "executions_per_s": count / (finished - started),
            "round_trips_per_execution": sum(s["round_trips"] for s in stats) / count,
            "worker_peak_rss_mb": max(s["peak_rss_mb"] for s in stats),
            "worker_cpu_us_per_execution": sum(s["cpu_seconds"] for s in stats) / count * 1e6,
            "redis_cpu_us_per_execution": redis_cpu / count * 1e6,
        }

    @staticmethod
    def _redis_cpu(client: sync_redis.Redis) -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def _enqueue(self, flow_name: str, count: int, payload_size: int = 0) -> list[str]:
        client = Redis.from_url(self.url)
        queue = Queue(client, Keys())
        await queue.setup()
        flow = load_flow(self.flows / f"{flow_name}.yaml", load_registry(entry_points=False))
        await queue.store_flow(flow)
        ids: list[str] = []
        trigger = {"phone": "+14155550123", "name": "Ada Lovelace", "source": "web", "pad": "x" * payload_size}
        for start in range(0, count, 1000):
            ids += await queue.enqueue_many(
                flow.name, flow.version, [{**trigger, "n": n} for n in range(start, min(count, start + 1000))]
            )
        await client.aclose()
        return ids

    def _span(self, client: sync_redis.Redis, ids: list[str]) -> tuple[float, float]:
        metas = self._metas(client, ids)
        return min(m["started_at"] for m in metas), max(m["finished_at"] for m in metas)

    @staticmethod
    def _metas(client: sync_redis.Redis, ids: list[str]) -> list[dict[str, Any]]:
        metas: list[dict[str, Any]] = []
        for start in range(0, len(ids), 5000):
            pipe = client.pipeline(transaction=False)
            for execution_id in ids[start : start + 5000]:
                pipe.hmget(Keys().execution(execution_id), ["m", "s"])
            metas += [{**orjson.loads(m), **orjson.loads(s)} for m, s in pipe.execute() if m and s]
        return metas

    # --- ingress -----------------------------------------------------------------

    def load(
        self, port: int, count: int, concurrency: int, rate: float | None = None, path: str = "noop1"
    ) -> dict[str, Any]:
        args = ["-m", "bench.load", f"http://127.0.0.1:{port}/hooks/{path}", SECRET, str(count), str(concurrency)]
        if rate:
            args.append(str(rate))
        out, _ = self.spawn(*args).communicate(timeout=600)
        return dict(json.loads(out))

    def ingress(self) -> None:
        count, concurrency = self.n(20_000, 3_000), 32
        self.flush()
        port = free_port()
        serve = self.serve(port, "--no-workers")
        self.load(port, 500, concurrency)  # warm up
        ours = self.load(port, count, concurrency)
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        self.flush()
        port = free_port()
        bare = self.spawn("-m", "bench.bare_ingress", self.url, str(port), ready="ready")
        self.load(port, 500, concurrency)
        theirs = self.load(port, count, concurrency)
        bare.send_signal(signal.SIGTERM)
        bare.wait(30)
        for result in (ours, theirs):
            result.pop("ids")
        self.results["ingress"] = {"flowchat": ours, "bare": theirs}

    # --- latency -----------------------------------------------------------------

    def latency(self) -> None:
        self.flush()
        port = free_port()
        serve = self.serve(port, "--concurrency", "64")
        client = sync_redis.Redis.from_url(self.url)
        burst = self.load(port, self.n(6_000, 1_500), 32)
        self._wait_done(client, len(burst["ids"]))
        started, finished = self._span(client, burst["ids"])
        # the most the one process sustains: what ingress accepted, or what the workers finished, whichever is less
        max_rate = min(burst["rate"], len(burst["ids"]) / (finished - started))
        half = max_rate / 2
        seconds = self.n(10, 4)
        paced = self.load(port, int(half * seconds), 64, rate=half)
        self._wait_done(client, len(burst["ids"]) + len(paced["ids"]))
        metas = self._metas(client, paced["ids"])
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        waits = sorted((m["finished_at"] - m["created_at"]) * 1000 for m in metas)
        self.results["latency"] = {
            "max_end_to_end_per_s": max_rate,
            "rate_per_s": half,
            "executions": len(waits),
            "p50_ms": waits[len(waits) // 2],
            "p99_ms": waits[min(len(waits) - 1, int(len(waits) * 0.99))],
        }

    @staticmethod
    def _wait_done(client: sync_redis.Redis, count: int) -> None:
        deadline = time.time() + 120
        while int(client.hget(Keys().counters, "succeeded:noop1") or 0) < count and time.time() < deadline:
            time.sleep(0.02)

    # --- memory ------------------------------------------------------------------

    def memory(self) -> None:
        self.flush()
        client = sync_redis.Redis.from_url(self.url)
        count = self.n(100_000, 10_000)
        asyncio.run(self._enqueue("noop1", 1))  # the group, the stored flow version
        before = int(client.info("memory")["used_memory"])
        asyncio.run(self._enqueue("noop1", count))
        after = int(client.info("memory")["used_memory"])
        self.results["memory"] = {"queued": count, "redis_bytes_per_execution": (after - before) / count}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    base = results["baseline"]["jobs_per_s"]
    q1, q5, q1x2 = results["queue_noop1"], results["queue_noop5"], results["queue_noop1_2_workers"]
    ours, bare = results["ingress"]["flowchat"], results["ingress"]["bare"]
    lat, mem = results["latency"], results["memory"]
    ratio1, ratio5, ingress_ratio = (
        q1["executions_per_s"] / base,
        q5["executions_per_s"] / base,
        ours["rate"] / bare["rate"],
    )
    results["targets"] = {
        "queue_ratio_ge_0.30": ratio1 >= 0.30,
        "ingress_ratio_ge_0.70": ingress_ratio >= 0.70,
        "p99_le_50ms": lat["p99_ms"] <= 50,
        "redis_bytes_le_2048": mem["redis_bytes_per_execution"] <= 2048,
    }
    t = results["targets"]
    return [
        ("baseline: bare Redis Streams", f"{base:,.0f} jobs/s", "", ""),
        (
            "queue: 1-node no-op flow",
            f"{q1['executions_per_s']:,.0f} exec/s",
            f"{ratio1:.2f}x baseline",
            f"≥ 0.30  {verdict(t['queue_ratio_ge_0.30'])}",
        ),
        ("queue: 5-node no-op flow", f"{q5['executions_per_s']:,.0f} exec/s", f"{ratio5:.2f}x baseline", ""),
        (
            "queue: 1-node, 2 worker processes",
            f"{q1x2['executions_per_s']:,.0f} exec/s",
            f"{q1x2['executions_per_s'] / base:.2f}x baseline",
            "",
        ),
        (
            "  round trips / execution",
            f"{q1['round_trips_per_execution']:.2f} (1 node), {q5['round_trips_per_execution']:.2f} (5 nodes)",
            "",
            "",
        ),
        (
            "ingress: bare aiohttp + XADD",
            f"{bare['rate']:,.0f} req/s",
            f"p50 {bare['p50_ms']:.1f} ms, p99 {bare['p99_ms']:.1f} ms",
            "",
        ),
        (
            "ingress: POST /hooks (HMAC)",
            f"{ours['rate']:,.0f} req/s",
            f"p50 {ours['p50_ms']:.1f} ms, p99 {ours['p99_ms']:.1f} ms",
            f"≥ 0.70 bare ({ingress_ratio:.2f})  {verdict(t['ingress_ratio_ge_0.70'])}",
        ),
        (
            "latency: accepted → finished",
            f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms",
            f"at {lat['rate_per_s']:,.0f}/s (half of {lat['max_end_to_end_per_s']:,.0f}/s)",
            f"p99 ≤ 50 ms  {verdict(t['p99_le_50ms'])}",
        ),
        (
            "memory: Redis / queued execution",
            f"{mem['redis_bytes_per_execution']:,.0f} B",
            f"{mem['queued']:,} queued",
            f"≤ 2 KB  {verdict(t['redis_bytes_le_2048'])}",
        ),
        ("memory: worker peak RSS", f"{q1['worker_peak_rss_mb']:.0f} MB", "draining the 1-node queue", ""),
        (
            "cpu / execution (1 node)",
            f"worker {q1['worker_cpu_us_per_execution']:.0f} µs, Redis {q1['redis_cpu_us_per_execution']:.0f} µs",
            "",
            "",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in well under a minute")
    parser.add_argument(
        "--cluster", action="store_true", help="only the Redis Cluster rows: a local 3-master cluster, 1 and 2 partitions"
    )
    args = parser.parse_args()
    if args.cluster:
        return cluster_main()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="flowchat-bench-") as workdir:
        bench = Bench(args.quick, Path(workdir))
        try:
            bench.baseline()
            bench.results["queue_noop1"] = bench.queue_drain("noop1")
            bench.results["queue_noop5"] = bench.queue_drain("noop5")
            bench.results["queue_noop1_2_workers"] = bench.queue_drain("noop1", workers=2)
            bench.ingress()
            bench.latency()
            bench.memory()
        finally:
            bench.close()
    results = bench.results
    rows = report(results)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis": sync_redis.__version__,
        "quick": args.quick,
        "seconds": round(time.time() - started, 1),
    }
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    print(
        f"({results['machine']['cpus']} CPUs, Python {results['machine']['python']}, {results['machine']['seconds']} s)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    return 0


def cluster_main(count: int = 20_000) -> int:
    """``--cluster``: queue throughput on a local Cluster (bench/results/cluster.json)."""
    from bench import cluster

    with tempfile.TemporaryDirectory(prefix="flowchat-bench-") as workdir:
        flows = Path(workdir) / "flows"
        flows.mkdir()
        (flows / "noop1.yaml").write_text(NOOP_FLOW.format(name="noop1", nodes=noop_nodes(1)))
        results = cluster.run(Path(workdir), flows, count)
    rows = cluster.rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    (RESULTS.parent / "cluster.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
