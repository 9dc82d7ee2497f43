"""flowchat.sink: the events stream into Parquet, off the hot path; one sink holds the lease, crashes redo once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analytics_data import append, bulk, count, physical_rows
from redis.asyncio import Redis
from support import run_cli, wait_for

from flowchat.keys import Keys
from flowchat.sink import GROUP, Sink
from flowchat.warehouse import Warehouse, entries_table


class CrashAfterWrite(Sink):
    """Writes its first batch, then dies before XACK (as a SIGKILL between write and ack would)."""

    async def _flush(self, batch: list[tuple[bytes, list[bytes]]]) -> None:
        assert self._warehouse is not None
        table = entries_table([fields for _, fields in batch])
        await asyncio.to_thread(self._warehouse.write, table, batch[0][0].decode() + "-crashed")
        raise RuntimeError("killed between write and ack")


async def test_a_batch_redone_after_a_crash_appears_once(
    redis_url: str, redis: Redis, start_sink: Callable[..., Sink], data_dir: Path
) -> None:
    events = bulk(3000)
    append(redis_url, events)
    crashing = start_sink(CrashAfterWrite, batch=1000)
    await wait_for(lambda: physical_rows(data_dir) >= 1000)
    crashing.stop()
    await asyncio.sleep(0.1)
    await redis.delete(Keys().sink_lease)  # the crashed sink's lease would lapse; do not wait for it
    pending = await redis.xpending(Keys().events, GROUP)
    assert pending["pending"] >= 1000
    start_sink(batch=1000)
    await wait_for(lambda: count(data_dir, "SELECT count(*) FROM node_runs") == 3000)
    assert count(data_dir, "SELECT count(DISTINCT event_id) FROM node_runs") == 3000
    assert physical_rows(data_dir) >= 3000
    await wait_for(lambda: _pending(redis_url) == 0)
    Warehouse(data_dir).compact(min_files=1)
    assert physical_rows(data_dir) == 3000
    assert count(data_dir, "SELECT count(*) FROM node_runs") == 3000


def _pending(url: str) -> int:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url)
    try:
        return int(client.xpending(Keys().events, GROUP)["pending"])
    finally:
        client.close()


async def test_one_sink_holds_the_lease_and_another_takes_over(
    redis_url: str, redis: Redis, start_sink: Callable[..., Sink], data_dir: Path
) -> None:
    first = start_sink(lease_ttl=0.6)
    await wait_for(lambda: redis.get(Keys().sink_lease))
    second = start_sink(lease_ttl=0.6)
    append(redis_url, bulk(100))
    await wait_for(lambda: first.stats.events == 100)
    assert second.stats.events == 0
    first.stop()  # releases the lease: the second takes over within a renewal period
    await wait_for(lambda: _holder(redis, second))
    append(redis_url, bulk(50))
    await wait_for(lambda: second.stats.events == 50)
    assert count(data_dir, "SELECT count(*) FROM node_runs") == 150 and first.stats.events == 100


async def _holder(redis: Redis, sink: Sink) -> bool:
    return bool(await redis.get(Keys().sink_lease) == sink.owner.encode())


async def test_batches_by_size_and_time(redis_url: str, start_sink: Callable[..., Sink], data_dir: Path) -> None:
    sink = start_sink(batch=400, flush=0.3)
    await wait_for(lambda: (data_dir / "analytics.duckdb").exists())
    append(redis_url, bulk(1000))
    await wait_for(lambda: sink.stats.events == 1000)
    assert count(data_dir, "SELECT count(*) FROM node_runs") == 1000
    assert sink.stats.batches >= 3  # two full batches, then the rest when the time is up
    started = time.monotonic()
    append(redis_url, bulk(1))
    await wait_for(lambda: count(data_dir, "SELECT count(*) FROM node_runs") == 1001)
    assert time.monotonic() - started < 5


async def test_the_stream_is_trimmed_only_to_what_was_acknowledged(
    redis_url: str, redis: Redis, start_sink: Callable[..., Sink], data_dir: Path
) -> None:
    append(redis_url, bulk(2500))
    start_sink(batch=500)
    await wait_for(lambda: count(data_dir, "SELECT count(*) FROM node_runs") == 2500)
    await wait_for(lambda: _pending(redis_url) == 0)
    assert await redis.xlen(Keys().events) < 2500  # trimmed (approximately: whole stream nodes)
    info = await redis.xinfo_groups(Keys().events)
    assert info[0]["name"] == GROUP.encode() and info[0]["pending"] == 0


async def test_hostile_entries_neither_stop_the_sink_nor_break_the_views(
    redis_url: str, redis: Redis, start_sink: Callable[..., Sink], data_dir: Path
) -> None:
    good = bulk(10)
    deep = "[" * 300 + "]" * 300  # orjson reads it but cannot write it again
    beside = '{"type": "metric", "ts": 5, "data": {"name": "beside deep", "value": 1}}'
    hostile: list[dict[Any, Any]] = [
        {"junk": "no contract fields at all"},
        {"id": "bad-json", "type": "execution", "ts": "1", "data": "{not json"},
        {"id": "bad-ts", "type": "metric", "ts": "yesterday", "data": '{"name": "m", "value": "NaN?"}'},
        {"id": b"\xff\xfe", "type": "contact", "data": b'{"action": "created", "phone": "\xff"}'},
        {"id": "array", "type": "node_run", "ts": "2", "data": "[1, 2]"},
        {"id": "unknown", "type": "mystery", "ts": "3", "data": "{}"},
        {"type": "metric", "data": '{"name": "no id", "value": 1}'},
        {"type": "metric", "data": '{"name": "no id either", "value": 2}'},
        # entries holding others: 5 rows, the metric beside the deep one among them
        {"type": "batch", "data": '{"events": "not a list"}'},
        {"type": "batch", "data": b"\xff\xfe"},
        {"type": "node_runs", "data": '{"runs": 5}'},
        {"type": "batch", "data": '{"events": [1, null, {"type": "metric", "data": ' + deep + "}, " + beside + "]}"},
        {"type": "execution", "data": '{"status": "ok", "runs": [{"node": "a", "deep": ' + deep + '}], "x": ' + deep + "}"},
    ]
    for fields in hostile:
        await redis.xadd(Keys().events, fields)
    append(redis_url, good)
    sink = start_sink()
    await wait_for(lambda: sink.stats.events == len(good) + len(hostile))
    assert count(data_dir, "SELECT count(*) FROM node_runs WHERE flow = 'load'") == 10
    assert count(data_dir, "SELECT count(*) FROM events") == 18 + 7
    assert count(data_dir, "SELECT count(*) FROM metrics WHERE name = 'beside deep'") == 1
    for view in ("executions", "node_runs", "messages", "metrics", "contact_events"):
        assert count(data_dir, f"SELECT count(*) FROM {view}") >= 0
    assert count(data_dir, "SELECT count(*) FROM metrics WHERE name LIKE 'no id%'") == 2
    assert _pending(redis_url) == 0


async def test_the_sink_compacts_and_expires_on_its_own(
    redis_url: str, start_sink: Callable[..., Sink], data_dir: Path
) -> None:
    sink = start_sink(batch=100, flush=0.05, compact_every=0.2, retention_days=3)
    from analytics_data import Recorder

    old = Recorder(hours_ago=24 * 10)  # ten days ago: past the retention
    old.add("metric", {"name": "old", "value": 1})
    append(redis_url, old.events)
    for _ in range(6):
        append(redis_url, bulk(100))
        await wait_for(lambda n=sink.stats.events: sink.stats.events > n)
    await wait_for(lambda: sink.stats.events == 601)
    def files() -> list[Path]:  # the sink may remove an expired day's folder while we look
        try:
            return sorted((data_dir / "analytics" / "events").glob("day=*/*.parquet"))
        except FileNotFoundError:
            return []

    # six batches of today, merged once four or more small files are there
    await wait_for(lambda: len(files()) < 6 and any(f.name.startswith("c-") for f in files()), timeout=10)
    assert count(data_dir, "SELECT count(*) FROM node_runs") == 600
    # expiry runs right after the compaction (maintenance: compact, then expire): wait for it too
    await wait_for(lambda: count(data_dir, "SELECT count(*) FROM metrics") == 0, timeout=10)


def test_sink_with_analytics_off_has_nothing_to_do(tmp_path: Path) -> None:
    env = {"FLOWCHAT_DATA_DIR": str(tmp_path), "FLOWCHAT_ANALYTICS": "off", "PATH": "/usr/bin:/bin"}
    out = run_cli("sink", env=env)
    assert out.returncode == 0 and "analytics is off" in out.stdout
