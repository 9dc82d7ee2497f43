"""The CRM rows: the full WhatsApp flow end to end, as users run it.

``examples/crm.yaml`` (inbound → validate → upsert contact → tag → rate-limit → send →
metric) runs from signed ``POST /twilio/message`` requests, each from a distinct sender:

- **outbox**: ``flowchat serve --no-workers`` accepts the inbounds (recording each on its
  contact, as in production), then 1 or 2 worker processes drain them; sends go to the
  outbox (no Twilio account), pacing off. Worker CPU, Redis CPU, round trips and Redis
  bytes per execution come from the 1-worker run.
- **paced**: the same with the default pacing (80/s per sender, 1/6 s per recipient):
  sends are deferred (the execution parks in Redis), none dropped.
- **twilio**: the same as outbox but sending through the real twilio client to a local
  Twilio-compatible server (the tests' fake, in its own process).
- **latency**: one ``flowchat serve`` process with its workers; inbound accepted → send
  recorded in the message ledger, paced at half the rate that process sustains.
- **memory**: Redis bytes per contact, for contacts as the flow leaves them (name,
  attribute, tag).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from flowchat.keys import Keys
from flowchat.redis_server import free_port

if TYPE_CHECKING:
    from bench.harness import Bench

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "crm.yaml"
PACING_OFF = {"FLOWCHAT_SEND_RATE": "off", "FLOWCHAT_RECIPIENT_RATE": "off"}
TWILIO_NUMBER = "+14155238886"
BURST = 80  # FLOWCHAT_SEND_RATE=80/1s lets one second's worth through at once


def crm_flow_folder(workdir: Path) -> tuple[Path, str]:
    """A folder holding only the CRM flow (and the files it refers to); where it came from."""
    source = EXAMPLE
    folder = workdir / "crm"
    folder.mkdir(exist_ok=True)
    shutil.copy(source, folder / "crm.yaml")
    for extra in source.parent.glob("*.json"):
        shutil.copy(extra, folder / extra.name)
    return folder, str(source.relative_to(ROOT))


def run_crm(bench: Bench) -> None:
    try:
        from flowchat.contacts import Contacts  # noqa: F401  (the CRM is installed)
    except ImportError:
        bench.results["crm_skipped"] = "flowchat.contacts is not installed yet"
        return
    folder, source = crm_flow_folder(bench.workdir)
    crm = CrmBench(bench, folder)
    count = bench.n(10_000, 200)  # enough that start-up and polling are noise in the per-execution costs
    results: dict[str, Any] = {"flow_file": source}
    results["outbox_1_worker"] = crm.drain(count, workers=1, env=PACING_OFF)
    results["outbox_2_workers"] = crm.drain(count, workers=2, env=PACING_OFF)
    results["outbox_paced"] = crm.paced(bench.n(480, 240))
    results["twilio_1_worker"] = crm.twilio(count)
    results["latency"] = crm.latency()
    results["memory"] = crm.contacts_memory(bench.n(100_000, 500))
    bench.results["crm"] = results


class CrmBench:
    """The CRM scenarios on one :class:`Bench`."""

    def __init__(self, bench: Bench, folder: Path) -> None:
        self.bench = bench
        self.folder = folder
        self.flow = "crm"

    # --- helpers -----------------------------------------------------------------------

    def inbound(
        self, count: int, env: dict[str, str], token: str, *options: str, first: int = 0, serve_workers: bool = False
    ) -> tuple[dict[str, Any], Any]:
        """Signed inbounds from ``count`` distinct senders; the load result and the still-running server."""
        port = free_port()
        server_options = () if serve_workers else ("--no-workers",)
        serve = self.bench.serve(port, *server_options, "--concurrency", "64", flows=self.folder, env=env)
        url = f"http://127.0.0.1:{port}/twilio/message"
        load = self.bench.load(url, count, 32, "--twilio", "--first", str(first), *options, secret=token)
        return load, serve

    def done(self) -> tuple[int, int]:
        client = self.bench.client()
        counters = client.hgetall(Keys().counters)
        value = {k.decode(): int(v) for k, v in counters.items()}
        # a failed execution also counts under dead:<flow> (its dead letter): count it once
        return value.get(f"succeeded:{self.flow}", 0), value.get(f"failed:{self.flow}", 0)

    def wait_done(self, count: int, timeout: float = 300) -> tuple[int, int]:
        deadline = time.time() + timeout
        while sum(done := self.done()) < count and time.time() < deadline:
            time.sleep(0.05)
        return done

    def messages(self) -> list[dict[str, str]]:
        """Every message in the ledger: sid, execution, created_at (ms)."""
        client = self.bench.client()
        keys = Keys()
        sids = [sid.decode() for sid in client.zrange(keys.messages, 0, -1)]
        pipe = client.pipeline(transaction=False)
        for sid in sids:
            pipe.hmget(keys.message(sid), ["execution", "created_at", "status"])
        found = []
        for sid, (execution, created, status) in zip(sids, pipe.execute(), strict=True):
            if execution and created:
                found.append(
                    {"sid": sid, "execution": execution.decode(), "created_at": int(created), "status": status.decode()}
                )
        return found

    def deferred(self, waited: float = 0.25) -> int:
        """Sends recorded more than ``waited`` s after their execution first started: pacing held them.

        (The execution's start, not the send node's: a succeeded execution keeps no node times.)
        """
        messages = self.messages()
        started = {meta["id"]: meta["started_at"] for meta in self.bench.metas([m["execution"] for m in messages])}
        return sum(
            1
            for message in messages
            if started.get(message["execution"])
            and message["created_at"] / 1000 - started[message["execution"]] > waited
        )

    def execution_bytes(self, ids: list[str], sample: int = 500) -> float:
        """Redis bytes of a finished execution's own state: its hash (MEMORY USAGE, a sample) and its index entry."""
        client, keys = self.bench.client(), Keys()
        chosen = ids[:sample]
        if not chosen:
            return 0.0
        pipe = client.pipeline(transaction=False)
        for execution_id in chosen:
            pipe.memory_usage(keys.execution(execution_id), samples=0)
        hashes = [int(size or 0) for size in pipe.execute()]
        index = keys.index(self.flow, "succeeded")
        entries = int(client.zcard(index) or 0)
        per_entry = int(client.memory_usage(index, samples=0) or 0) / entries if entries else 0.0
        return sum(hashes) / len(hashes) + per_entry

    def seed_contacts(self, count: int, first: int = 0) -> None:
        """Contacts as the flow leaves them (name, attribute, tag), for the senders to come."""
        from bench.load import sender
        from flowchat.contacts import Contacts

        async def seed() -> None:
            redis = Redis.from_url(self.bench.url)
            contacts = Contacts(redis, Keys())
            for start in range(first, first + count, 250):
                phones = [sender(n) for n in range(start, min(first + count, start + 250))]
                await asyncio.gather(
                    *(contacts.upsert(p, f"Customer {n}", {"last_message": "Hi"}) for n, p in enumerate(phones))
                )
                await asyncio.gather(*(contacts.tag(p, add=["inbound"]) for p in phones))
            await redis.aclose()

        asyncio.run(seed())

    # --- scenarios ---------------------------------------------------------------------

    def drain(self, count: int, workers: int, env: dict[str, str], token: str | None = None) -> dict[str, Any]:
        """Accept ``count`` inbounds, then time ``workers`` processes draining them."""
        from bench.harness import TWILIO_TOKEN

        bench = self.bench
        bench.flush()
        self.seed_contacts(count)
        empty, events_empty = bench.used_memory(), bench.events_bytes()
        load, serve = self.inbound(count, env, token or TWILIO_TOKEN)
        bench.stop(serve)
        ids = bench.flow_ids(self.flow)
        queued = bench.used_memory() - (bench.events_bytes() - events_empty)
        cpu_before = bench.reset_stats()
        procs = bench.workers(workers, flows=self.folder, env=env)
        succeeded, failed = self.wait_done(len(ids))
        stats = bench.stop_workers(procs)
        redis_cpu = bench.redis_cpu() - cpu_before
        commands = bench.command_stats(max(1, len(ids)))
        finished, events = bench.used_memory(), bench.events_bytes() - events_empty
        metas = bench.metas(ids)
        span = max(m["finished_at"] or 0 for m in metas) - min(m["started_at"] or 1e18 for m in metas)
        sends = self.messages()
        executions = max(1, len(ids))
        return {
            "workers": workers,
            "inbound": {k: v for k, v in load.items() if k != "ids"},
            "executions": len(ids),
            "succeeded": succeeded,
            "failed": failed,
            "sends": len(sends),
            "executions_per_s": succeeded / span if span > 0 else 0.0,
            "round_trips_per_execution": sum(s["round_trips"] for s in stats) / executions,
            "commands_per_execution": sum(s.get("commands", 0) for s in stats) / executions,
            "worker_system_cpu_us_per_execution": sum(s["system_cpu_seconds"] for s in stats) / executions * 1e6,
            "worker_cpu_us_per_execution": sum(s["cpu_seconds"] for s in stats) / executions * 1e6,
            "redis_cpu_us_per_execution": redis_cpu / executions * 1e6,
            "redis_bytes_per_queued": (queued - empty) / executions,
            "redis_bytes_per_finished": (finished - empty - events) / executions,
            "execution_bytes_per_finished": self.execution_bytes(ids),
            "events_bytes_per_execution": events / executions,
            "commandstats_per_execution": commands,
        }

    def paced(self, count: int) -> dict[str, Any]:
        """Default pacing: every send waits for the 80/s sender limit; nothing is dropped."""
        result = self.drain(count, workers=1, env={})
        times = sorted(m["created_at"] / 1000 for m in self.messages())
        # the limiter lets a second's worth (80) through at once, then 80/s: the rate beyond that burst
        span = times[-1] - times[0] if times else 0.0
        rate = (len(times) - BURST) / span if span > 0 else 0.0
        busiest = max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)), default=0)
        deferred = self.deferred()
        return {
            "executions": result["executions"],
            "sent": result["sends"],
            "failed": result["failed"],
            "deferred": deferred,
            "sends_per_s": rate,
            "seconds": span,
            "most_in_one_second": busiest,
        }

    def twilio(self, count: int) -> dict[str, Any]:
        """Sends through the real twilio client to a local Twilio-compatible server."""
        from tests.twilio_fake import ACCOUNT_SID, AUTH_TOKEN

        fake = self.bench.spawn("-m", "bench.twilio_server")
        assert fake.stdout is not None
        ready = fake.stdout.readline().split()
        if ready[:1] != ["ready"]:
            fake.kill()
            raise RuntimeError(f"the Twilio fake did not start: {ready}")
        env = {
            **PACING_OFF,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_WHATSAPP_NUMBER": TWILIO_NUMBER,
            "FLOWCHAT_TWILIO_API_URL": ready[1],
        }
        result = self.drain(count, workers=1, env=env, token=AUTH_TOKEN)
        result["api_requests"] = json.loads(self.bench.stop(fake).strip().splitlines()[-1])["posts"]
        return result

    def latency(self) -> dict[str, Any]:
        """Inbound accepted → send recorded, in one serve process, at half its measured maximum."""
        from bench.harness import TWILIO_TOKEN, percentile

        bench = self.bench
        bench.flush()
        burst_count = bench.n(2_000, 150)
        seconds = bench.n(10, 1)
        port = free_port()
        serve = bench.serve(port, "--concurrency", "64", flows=self.folder, env=PACING_OFF)
        url = f"http://127.0.0.1:{port}/twilio/message"
        burst = bench.load(url, burst_count, 32, "--twilio", secret=TWILIO_TOKEN)
        self.wait_done(burst_count, timeout=120)
        sends = self.messages()
        metas = {m["id"]: m for m in bench.metas(bench.flow_ids(self.flow))}
        first = min(m["created_at"] for m in metas.values())
        last_send = max(s["created_at"] for s in sends) / 1000
        max_rate = min(burst["rate"], len(sends) / (last_send - first))
        half = max_rate / 2
        before = {s["sid"] for s in sends}
        paced_count = max(20, int(half * seconds))
        bench.load(url, paced_count, 64, "--twilio", "--first", "500000", "--rate", str(half), secret=TWILIO_TOKEN)
        self.wait_done(burst_count + paced_count, timeout=120)
        bench.stop(serve)
        metas = {m["id"]: m for m in bench.metas(bench.flow_ids(self.flow))}
        waits = sorted(
            (s["created_at"] / 1000 - metas[s["execution"]]["created_at"]) * 1000
            for s in self.messages()
            if s["sid"] not in before and s["execution"] in metas
        )
        return {
            "max_end_to_end_per_s": max_rate,
            "rate_per_s": half,
            "executions": len(waits),
            "p50_ms": percentile(waits, 0.50),
            "p99_ms": percentile(waits, 0.99),
        }

    def contacts_memory(self, count: int) -> dict[str, Any]:
        bench = self.bench
        bench.flush()
        empty = bench.used_memory()
        self.seed_contacts(count)
        return {"contacts": count, "redis_bytes_per_contact": (bench.used_memory() - empty) / count}
