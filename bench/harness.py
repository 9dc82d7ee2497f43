"""The benchmark harness: its own redis-server, the flows, processes it starts, and each engine row.

Every measured part runs in its own process, started the way an operator starts it
(``flowchat serve``, the real worker runtime), with the load generator apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis as sync_redis
from redis.asyncio import Redis

from bench.stored import indexed_ids, summaries
from flowchat.keys import Keys
from flowchat.loader import load_flow
from flowchat.queue import Queue
from flowchat.redis_server import RedisServer, free_port
from flowchat.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret"
SECRET_ENV = "FLOWCHAT_BENCH_SECRET"
TWILIO_TOKEN = "bench-twilio-auth-token-0123456789"

NOOP_FLOW = """flow: {name}
trigger: {{type: webhook, path: {name}, secret_env: FLOWCHAT_BENCH_SECRET}}
nodes:
{nodes}
"""
INBOUND_FLOW = """flow: inbound1
trigger: {type: twilio.message}
nodes:
  - {id: n0, type: set, with: {values: {}}}
"""


def noop_nodes(count: int) -> str:
    return "\n".join(f"  - {{id: n{i}, type: set, with: {{values: {{}}}}}}" for i in range(count))


class Bench:
    """One run: the Redis it measures against, its flows and environment, and the results so far."""

    def __init__(self, quick: bool, workdir: Path) -> None:
        self.quick = quick
        self.workdir = workdir
        self.server = RedisServer(workdir / "redis", port=free_port()).start()
        self.url = self.server.url
        self.flows = workdir / "flows"
        self.flows.mkdir()
        for name, count in (("noop1", 1), ("noop5", 5)):
            (self.flows / f"{name}.yaml").write_text(NOOP_FLOW.format(name=name, nodes=noop_nodes(count)))
        (self.flows / "inbound1.yaml").write_text(INBOUND_FLOW)
        shutil.copy(ROOT / "flows" / "lead_intake.yaml", self.flows / "lead_intake.yaml")
        (workdir / "plugins").mkdir()
        self.env = {
            **os.environ,
            "FLOWCHAT_REDIS_URL": self.url,
            "FLOWCHAT_DATA_DIR": str(workdir / "data"),
            "FLOWCHAT_PLUGINS": str(workdir / "plugins"),
            SECRET_ENV: SECRET,
            "FLOWCHAT_WEBHOOK_TOKEN": SECRET,
            "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("TWILIO_ACCOUNT_SID", "FLOWCHAT_TWILIO_API_URL", "FLOWCHAT_PUBLIC_URL", "FLOWCHAT_QUEUE"):
            self.env.pop(name, None)
        self.results: dict[str, Any] = {}

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def client(self) -> sync_redis.Redis:
        return sync_redis.Redis.from_url(self.url)

    def flush(self) -> None:
        client = self.client()
        client.flushall()
        client.close()

    def close(self) -> None:
        self.server.stop()

    def redis_version(self) -> str:
        return str(self.client().info("server")["redis_version"])

    def spawn(self, *args: str, ready: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
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

    def serve(
        self, port: int, *options: str, flows: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """`flowchat serve` as an operator runs it, on the bench's flows and Redis."""
        folder = str(flows or self.flows)
        args = ["-m", "flowchat.cli", "--log-level", "ERROR", "serve", "--flows", folder, "--port", str(port)]
        return self.spawn(*args, *options, ready="flowchat:", env=env)

    @staticmethod
    def stop(process: subprocess.Popen[str]) -> str:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        return out

    def workers(
        self, count: int, flows: Path | None = None, env: dict[str, str] | None = None
    ) -> list[subprocess.Popen[str]]:
        folder = str(flows or self.flows)
        args = ("-m", "bench.worker_proc", self.url, folder, os.environ.get("BENCH_CONCURRENCY", "64"))
        procs = [self.spawn(*args, ready="ready", env={**(env or {}), "BENCH_WAIT_GO": "1"}) for _ in range(count)]
        for proc in procs:  # all start together
            proc.send_signal(signal.SIGUSR1)
        return procs

    def stop_workers(self, procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
        return [json.loads(self.stop(proc).strip().splitlines()[-1]) for proc in procs]

    # --- Redis measurements ------------------------------------------------------------

    def used_memory(self) -> int:
        return int(self.client().info("memory")["used_memory"])

    def events_bytes(self) -> int:
        """Bytes of the analytics events stream (kept until `flowchat sink` has read and trimmed it)."""
        return int(self.client().memory_usage(Keys().events, samples=0) or 0)

    def redis_cpu(self) -> float:
        """Seconds of CPU of Redis's main thread (commands, networking), user + system."""
        info = self.client().info("cpu")
        if "used_cpu_user_main_thread" in info:
            return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def reset_stats(self) -> float:
        """Zero INFO commandstats; the CPU reading to subtract later."""
        self.client().config_resetstat()
        return self.redis_cpu()

    def command_stats(self, executions: int) -> dict[str, dict[str, float]]:
        """INFO commandstats per execution: calls and µs of each command, busiest first.

        Commands a Lua script runs are counted under their own names as well as inside
        ``evalsha``'s time, so the µs do not add up to a total; Redis CPU comes from INFO cpu.
        """
        stats = self.client().info("commandstats")
        per = {
            name.removeprefix("cmdstat_"): {
                "calls": round(value["calls"] / executions, 3),
                "us": round(value["usec"] / executions, 2),
            }
            for name, value in stats.items()
        }
        return dict(sorted(per.items(), key=lambda item: -item[1]["us"]))

    def wait_counter(self, name: str, count: int, timeout: float = 300) -> int:
        client = self.client()
        deadline = time.time() + timeout
        while (done := int(client.hget(Keys().counters, name) or 0)) < count and time.time() < deadline:
            time.sleep(0.02)
        return done

    # --- baseline ----------------------------------------------------------------------

    def baseline(self) -> None:
        self.flush()
        count = self.n(200_000, 10_000)
        self.client().xgroup_create("bench:baseline", "g", id="0", mkstream=True)
        consumer = self.spawn("-m", "bench.baseline", "consume", self.url, str(count))
        producer = self.spawn("-m", "bench.baseline", "produce", self.url, str(count))
        producer.wait()
        out, _ = consumer.communicate()
        consumed = json.loads(out)
        rate = count / (consumed["last_ack"] - consumed["first_read"])
        self.results["baseline"] = {"jobs": count, "jobs_per_s": rate}

    # --- queue, cost and retained memory -------------------------------------------------

    def queue_drain(self, flow_name: str, workers: int = 1) -> dict[str, Any]:
        """Enqueue in bulk, then time workers draining it; CPU, round trips and memory per execution."""
        self.flush()
        count = self.n(30_000, 1_000)
        asyncio.run(self._enqueue(flow_name, 0))  # the group and the stored flow version
        empty = self.used_memory()
        ids = asyncio.run(self._enqueue(flow_name, count))
        queued = self.used_memory()
        cpu_before = self.reset_stats()
        procs = self.workers(workers)
        self.wait_counter(f"succeeded:{flow_name}", count)
        stats = self.stop_workers(procs)
        redis_cpu = self.redis_cpu() - cpu_before
        finished, events = self.used_memory(), self.events_bytes()
        started_at, finished_at = self._span(ids)
        return {
            "workers": workers,
            "executions": count,
            "executions_per_s": count / (finished_at - started_at),
            "round_trips_per_execution": sum(s["round_trips"] for s in stats) / count,
            "worker_peak_rss_mb": max(s["peak_rss_mb"] for s in stats),
            "worker_cpu_us_per_execution": sum(s["cpu_seconds"] for s in stats) / count * 1e6,
            "redis_cpu_us_per_execution": redis_cpu / count * 1e6,
            "redis_bytes_per_queued": (queued - empty) / count,
            "redis_bytes_per_finished": (finished - empty - events) / count,
            "events_bytes_per_execution": events / count,
            "commandstats_per_execution": self.command_stats(count),
        }

    async def _enqueue(self, flow_name: str, count: int, payload_size: int = 0) -> list[str]:
        client = Redis.from_url(self.url)
        queue = Queue(client, Keys())
        await queue.setup()
        flow = load_flow(self.flows / f"{flow_name}.yaml", load_registry(entry_points=True))
        await queue.store_flow(flow)
        ids: list[str] = []
        trigger = {
            "phone": "+14155550123",
            "name": "ada lovelace",
            "interests": ["a", "b"],
            "source": "web",
            "pad": "x" * payload_size,
        }
        for start in range(0, count, 1000):
            ids += await queue.enqueue_many(
                flow.name, flow.version, [{**trigger, "n": n} for n in range(start, min(count, start + 1000))]
            )
        await client.aclose()
        return ids

    def _span(self, ids: list[str]) -> tuple[float, float]:
        metas = self.metas(ids)
        return min(m["started_at"] for m in metas), max(m["finished_at"] for m in metas)

    def metas(self, ids: list[str]) -> list[dict[str, Any]]:
        """Each execution's status and times, of either stored form (a succeeded one is compact)."""
        return summaries(self.client(), Keys(), ids)

    def flow_ids(self, flow: str | None = None) -> list[str]:
        """Every execution id in the indexes (of one flow when named), oldest first."""
        ids = sorted(indexed_ids(self.client(), Keys()))  # ids start with their creation time
        if flow is None:
            return ids
        return [m["id"] for m in self.metas(ids) if m["flow"] == flow]

    # --- ingress -----------------------------------------------------------------------

    def load(self, url: str, count: int, concurrency: int, *options: str, secret: str = SECRET) -> dict[str, Any]:
        out, _ = self.spawn("-m", "bench.load", url, secret, str(count), str(concurrency), *options).communicate(
            timeout=600
        )
        return dict(json.loads(out))

    def _ingress_pair(self, path: str, *options: str, secret: str) -> dict[str, Any]:
        """Ours (`flowchat serve --no-workers`) and the bare handler, same load, same run."""
        count, concurrency = self.n(10_000, 600), 32
        results: dict[str, Any] = {}
        # alternate the two, best of the rounds each: a shared machine's load comes and goes
        for name in ("flowchat", "bare") * self.n(2, 1):
            self.flush()
            port = free_port()
            if name == "flowchat":
                server = self.serve(port, "--no-workers")
            else:
                server = self.spawn("-m", "bench.bare_ingress", self.url, str(port), TWILIO_TOKEN, ready="ready")
            url = f"http://127.0.0.1:{port}{path}"
            result = self.load(url, count, concurrency, *options, "--warmup", str(self.n(500, 100)), secret=secret)
            result.pop("ids")
            self.stop(server)
            if name not in results or result["rate"] > results[name]["rate"]:
                results[name] = result
        return results

    def ingress(self) -> None:
        self.results["ingress"] = self._ingress_pair("/hooks/noop1", secret=SECRET)

    def ingress_twilio(self) -> None:
        self.results["ingress_twilio"] = self._ingress_pair("/twilio/message", "--twilio", secret=TWILIO_TOKEN)

    # --- latency -------------------------------------------------------------------------

    def latency(self) -> None:
        self.flush()
        port = free_port()
        serve = self.serve(port, "--concurrency", "64")
        url = f"http://127.0.0.1:{port}/hooks/noop1"
        burst = self.load(url, self.n(6_000, 500), 32)
        self.wait_counter("succeeded:noop1", len(burst["ids"]), timeout=120)
        started, finished = self._span(burst["ids"])
        # the most the one process sustains: what ingress accepted, or what the workers finished, whichever is less
        max_rate = min(burst["rate"], len(burst["ids"]) / (finished - started))
        half = max_rate / 2
        seconds = self.n(10, 2)
        paced = self.load(url, int(half * seconds), 64, "--rate", str(half))
        self.wait_counter("succeeded:noop1", len(burst["ids"]) + len(paced["ids"]), timeout=120)
        metas = self.metas(paced["ids"])
        self.stop(serve)
        waits = sorted((m["finished_at"] - m["created_at"]) * 1000 for m in metas)
        self.results["latency"] = {
            "max_end_to_end_per_s": max_rate,
            "rate_per_s": half,
            "executions": len(waits),
            "p50_ms": percentile(waits, 0.50),
            "p99_ms": percentile(waits, 0.99),
        }

    # --- CRM -------------------------------------------------------------------------------

    def crm_rows(self) -> None:
        from bench.crm import run_crm

        run_crm(self)


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0
