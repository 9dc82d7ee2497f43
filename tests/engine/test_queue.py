"""Queue guarantees in isolation: lease ownership, reclaim scans, the delayed set, poison limits, retention, replay races."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import enqueue, fail_until, settled, wait_for, write_flow

from flowchat.codec import execution_from_parts
from flowchat.keys import GROUP
from flowchat.operations import load_execution, replay
from flowchat.outcome import Outcome
from flowchat.queue import RETENTION, RETENTION_SUCCEEDED


async def test_finish_by_a_consumer_that_lost_its_lease_writes_nothing(queue, flows_dir, catalog_factory):
    write_flow(flows_dir, "owned", "  - {id: a, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    execution_id = await enqueue(queue, catalog, "owned")
    [delivery] = await queue.read("a", 1, 50)
    await queue.redis.xclaim(queue.keys.ready, GROUP, "b", 0, [delivery.message_id], justid=True)
    [loaded] = await queue.load([delivery])
    flow = catalog.get("owned")
    execution = execution_from_parts(loaded.meta, loaded.nodes, [(n.id, n.type) for n in flow.nodes.values()])
    execution.status = "succeeded"
    assert await queue.finish(delivery, Outcome(execution, "done", "succeeded"), "a") is False
    stored = await queue.get(execution_id)
    assert stored is not None and stored[0]["status"] == "queued"
    [entry] = await queue.redis.xpending_range(queue.keys.ready, GROUP, "-", "+", 10)
    assert entry["consumer"] == b"b"
    assert await queue.redis.hget(queue.keys.counters, "succeeded:owned") is None


async def test_reclaim_finds_an_expired_lease_behind_many_live_ones(queue, flows_dir, catalog_factory):
    write_flow(flows_dir, "many", "  - {id: a, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    ids = [await enqueue(queue, catalog, "many") for _ in range(25)]
    deliveries = await queue.read("a", 25, 50)
    await asyncio.sleep(0.3)
    await queue.redis.xclaim(queue.keys.ready, GROUP, "a", 0, [d.message_id for d in deliveries[:-1]], justid=True)
    found = await queue.reclaim("b", 200, count=1)
    assert [d.execution_id for d in found] == [ids[-1]]


async def test_the_mover_leaves_work_that_is_not_due(queue):
    now = time.time()
    await queue.redis.zadd(queue.keys.delayed, {"later": now + 60, "due": now - 1})
    assert await queue.move_due(now) == 1
    assert [f[b"e"] for _, f in await queue.redis.xrange(queue.keys.ready)] == [b"due"]
    assert await queue.redis.zscore(queue.keys.delayed, "later") == pytest.approx(now + 60)


async def test_a_retry_is_parked_until_its_wake_at(queue, flows_dir, catalog_factory, start_worker, tmp_path):
    write_flow(
        flows_dir,
        "slowretry",
        [fail_until(tmp_path / "never", retry={"max_attempts": 3, "backoff": "10s", "max_backoff": "10s"})],
    )
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog, concurrency=1)
    execution_id = await enqueue(queue, catalog, "slowretry")

    async def parked() -> bool:
        return await queue.redis.zscore(queue.keys.delayed, execution_id) is not None

    await wait_for_parked(parked)
    score = await queue.redis.zscore(queue.keys.delayed, execution_id)
    stored = await load_execution(queue, execution_id)
    assert stored is not None and score == pytest.approx(stored.nodes["call"].wake_at)
    assert score > time.time() + 5
    await asyncio.sleep(0.5)
    assert await queue.redis.zscore(queue.keys.delayed, execution_id) == score
    assert await queue.redis.hget(queue.keys.execution(execution_id), "d") == b"0"


async def wait_for_parked(predicate):
    from support import wait_for

    await wait_for(predicate)


async def test_a_replayed_execution_cannot_be_requeued_twice(queue, flows_dir, catalog_factory, start_worker, tmp_path):
    write_flow(
        flows_dir,
        "once",
        [fail_until(tmp_path / "never", retryable=False)],
    )
    catalog = catalog_factory(flows_dir)
    worker = await start_worker(catalog)
    execution_id = await enqueue(queue, catalog, "once")
    assert (await settled(queue, execution_id))["status"] == "failed"
    worker.stop()
    await asyncio.sleep(0.2)
    results = await asyncio.gather(replay(queue, execution_id), replay(queue, execution_id))
    assert sum(result is not None for result in results) == 1
    assert await queue.redis.xlen(queue.keys.ready) == 1


async def test_replaying_a_poison_execution_runs_it(queue, flows_dir, catalog_factory, start_worker):
    write_flow(flows_dir, "calm", "  - {id: a, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    execution_id = await enqueue(queue, catalog, "calm")
    await queue.redis.hset(queue.keys.execution(execution_id), "d", queue.max_deliveries)
    await start_worker(catalog)
    assert (await settled(queue, execution_id))["error"]["code"] == "poison"

    assert await replay(queue, execution_id) is not None
    meta = await settled(queue, execution_id)
    assert meta["status"] == "succeeded", meta


async def test_exactly_max_deliveries_still_runs(queue, flows_dir, catalog_factory, start_worker):
    write_flow(flows_dir, "edge", "  - {id: a, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    execution_id = await enqueue(queue, catalog, "edge")
    await queue.redis.hset(queue.keys.execution(execution_id), "d", queue.max_deliveries - 1)
    await start_worker(catalog)
    meta = await settled(queue, execution_id)
    assert meta["status"] == "succeeded", meta
    assert await queue.dead_letters() == []


async def test_finished_executions_expire_after_their_retention_failed_ones_later(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    write_flow(flows_dir, "ok", "  - {id: a, type: test.noop}\n")
    write_flow(
        flows_dir,
        "bad",
        [fail_until(tmp_path / "x", "a", retryable=False)],
    )
    catalog = catalog_factory(flows_dir)
    await start_worker(catalog)
    good, bad = await enqueue(queue, catalog, "ok"), await enqueue(queue, catalog, "bad")
    await settled(queue, good)
    await settled(queue, bad)
    # FLOWCHAT_RETENTION_SUCCEEDED (24h) and FLOWCHAT_RETENTION_FAILED (7d) by default
    assert 0 < await queue.redis.ttl(queue.keys.execution(good)) <= RETENTION_SUCCEEDED
    assert RETENTION_SUCCEEDED < await queue.redis.ttl(queue.keys.execution(bad)) <= RETENTION


async def test_an_execution_of_an_unknown_flow_version_is_dead_lettered_as_flow_missing(
    queue, flows_dir, catalog_factory, start_worker
):
    catalog = catalog_factory(flows_dir)
    execution_id, _ = await queue.enqueue("ghost", "v0", {})
    await start_worker(catalog, visibility_timeout=0.5)
    meta = await settled(queue, execution_id)
    assert meta["status"] == "failed" and meta["error"]["code"] == "flow-missing"
    assert [letter["code"] for letter in await queue.dead_letters()] == ["flow-missing"]


async def test_listing_one_flow_reads_its_own_index_not_every_execution(queue, flows_dir, catalog_factory):
    from flowchat.operations import list_executions

    write_flow(flows_dir, "busy", "  - {id: a, type: test.noop}\n")
    write_flow(flows_dir, "rare", "  - {id: a, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    rare = [await enqueue(queue, catalog, "rare")]
    busy = catalog.get("busy")
    await queue.store_flow(busy)
    await queue.enqueue_many(busy.name, busy.version, [{} for _ in range(500)])
    rare.append(await enqueue(queue, catalog, "rare"))
    reads: list[int] = []
    summaries = queue.summaries

    async def counting(ids: list[str]) -> list[dict]:
        reads.append(len(ids))
        return await summaries(ids)

    queue.summaries = counting  # type: ignore[method-assign]
    rows = await list_executions(queue, "rare", None, 20)

    assert [row["id"] for row in rows] == rare[::-1]
    assert sum(reads) == 2  # what it shows, not the 500 executions of the other flow
    assert [row["flow"] for row in await list_executions(queue, None, "queued", 3)] == ["rare", "busy", "busy"]


async def test_listing_dead_executions_reads_only_them_through_the_status_index(
    queue, redis_url, flows_dir, catalog_factory, start_worker, tmp_path
):
    """5,000 executions of one flow, 10 dead: `executions list --status dead --limit 20` reads those 10."""
    import json
    import subprocess
    import sys

    from support import ROOT, daemon_env

    exists = tmp_path / "exists"
    exists.touch()
    write_flow(
        flows_dir,
        "mixed",
        "  - {id: gate, type: test.fail_until, with: {exists: '{{ trigger.path }}', retryable: false}}\n",
    )
    catalog = catalog_factory(flows_dir)
    flow = catalog.get("mixed")
    await queue.store_flow(flow)
    triggers = [{"path": str(exists if n % 500 else tmp_path / "missing")} for n in range(5000)]
    ids = await queue.enqueue_many(flow.name, flow.version, triggers)
    dead = {execution_id for execution_id, trigger in zip(ids, triggers, strict=True) if "missing" in trigger["path"]}
    await start_worker(catalog, concurrency=64)

    async def settled_all() -> bool:
        counts = await queue.redis.hmget(queue.keys.counters, ["succeeded:mixed", "failed:mixed"])
        return sum(int(count or 0) for count in counts) == 5000

    await wait_for(settled_all, timeout=60, interval=0.1)
    before = await queue.redis.info("commandstats")
    listed = subprocess.run(
        [sys.executable, "-m", "flowchat.cli", "executions", "list", "--status", "dead", "--limit", "20", "--json"],
        cwd=ROOT,
        env=daemon_env(redis_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    after = await queue.redis.info("commandstats")

    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {row["id"] for row in rows} == dead and len(rows) == 10
    assert [row["created_at"] for row in rows] == sorted((row["created_at"] for row in rows), reverse=True)
    calls = {
        name.removeprefix("cmdstat_"): stats["calls"] - before.get(name, {}).get("calls", 0)
        for name, stats in after.items()
    }
    calls.pop("info", None)  # this test's own
    assert calls.get("hmget") == 10  # one hash per row shown, none of the 4,990 others
    assert calls.get("zrevrangebyscore") == 1  # the flow's index of failed executions
    assert sum(calls.values()) <= 20, calls  # the rest: the CLI's start-up (consumer group, flows)


async def test_every_status_change_moves_the_execution_to_the_index_of_its_new_status(
    queue, flows_dir, catalog_factory, start_worker, tmp_path
):
    marker = tmp_path / "fixed"
    write_flow(flows_dir, "walk", [fail_until(marker, "gate", retry={"max_attempts": 2, "backoff": "300ms"})])
    catalog = catalog_factory(flows_dir)

    async def where(execution_id: str) -> list[str]:
        found = [index for index in await queue.indexes("walk") if await queue.redis.zscore(index, execution_id)]
        return [index.rsplit(":", 2)[-2] for index in found]

    async def reaches(execution_id: str, status: str) -> None:
        await wait_for(lambda: _has_status(queue, execution_id, status))
        assert await where(execution_id) == [status]

    walker, cancelled = await enqueue(queue, catalog, "walk"), await enqueue(queue, catalog, "walk")
    assert await where(walker) == ["queued"]
    assert await queue.cancel(cancelled) == "cancelled"
    assert await where(cancelled) == ["cancelled"]
    worker = await start_worker(catalog)
    await reaches(walker, "waiting")  # the first attempt failed: parked for its backoff
    await reaches(walker, "failed")  # the second too: dead-lettered
    worker.stop()
    assert await replay(queue, walker) is not None
    assert await where(walker) == ["queued"]
    marker.touch()
    await start_worker(catalog)
    await reaches(walker, "succeeded")
    assert await queue.total() == 2


async def _has_status(queue, execution_id: str, status: str) -> bool:
    stored = await queue.get(execution_id)
    return stored is not None and stored[0]["status"] == status


async def test_indexes_of_an_older_version_are_moved_into_the_per_status_ones(queue, flows_dir, catalog_factory):
    write_flow(flows_dir, "old", "  - {id: a, type: test.noop}\n")
    catalog = catalog_factory(flows_dir)
    queued, finished = await enqueue(queue, catalog, "old"), await enqueue(queue, catalog, "old")
    await queue.redis.hset(queue.keys.execution(finished), "s", '{"status": "succeeded", "flow_version": "v"}')
    for execution_id in (queued, finished):  # as the previous version left them: one index of all, one per flow
        score = await queue.redis.zscore(queue.keys.index("old", "queued"), execution_id)
        await queue.redis.zadd(queue.keys.legacy_index, {execution_id: score, "expired-long-ago": 1.0})
        await queue.redis.zadd(queue.keys.legacy_flow_index("old"), {execution_id: score})
    await queue.redis.delete(queue.keys.index("old", "queued"))

    await queue.setup()

    assert [row["id"] for row in await queue.recent(10, status="queued")] == [queued]
    assert [row["id"] for row in await queue.recent(10, status="succeeded")] == [finished]
    for key in (queue.keys.legacy_index, queue.keys.legacy_flow_index("old")):
        assert not await queue.redis.exists(key)
