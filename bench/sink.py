"""`python -m bench.sink URL COUNT`: the analytics sink's events/s beside a raw DuckDB Arrow insert.

The sink drains COUNT events already in the stream (XREADGROUP, rows, Parquet through DuckDB,
fsync, XACK, trim) into a fresh data dir; the raw side builds an Arrow table of the same rows and
inserts it into a DuckDB table (no Redis, no files). The events are in the stream as the engine
writes them: ``batch`` entries of BATCH events (a busy worker's loop turn), each unpacked into its
rows by the sink. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import redis as sync_redis
from redis.asyncio import Redis

from flowchat.events import stream_fields
from flowchat.keys import Keys
from flowchat.sink import Sink, SinkSettings
from flowchat.warehouse import COLUMNS, SCHEMA, event_row


def events(count: int) -> list[dict[str, str]]:
    """Node-run events shaped as the runtime writes them (the commonest kind)."""
    now = int(time.time() * 1000)
    rows = []
    for i in range(count):
        data = {"node_type": "set", "status": "ok", "attempt": 1, "started_at": now + i, "duration_ms": 1}
        rows.append(
            {
                "id": f"{i:032x}",
                "type": "node_run",
                "ts": str(now + i),
                "flow": "bench",
                "execution_id": f"{i // 5:032x}",
                "node": f"n{i % 5}",
                "data": orjson.dumps({**data, "error_code": ""}).decode(),
            }
        )
    return rows


BATCH = 50
"""Events per stream entry, as the engine's events writer leaves them under load (one entry per loop turn)."""


def fill(url: str, rows: list[dict[str, str]]) -> int:
    """Append ``rows`` as the engine does (``batch`` entries of BATCH events); the number of entries."""
    client = sync_redis.Redis.from_url(url)
    client.delete(Keys().events, Keys().sink_lease)
    pipe = client.pipeline(transaction=False)
    events = [{**row, "ts": int(row["ts"]), "data": orjson.loads(row["data"])} for row in rows]
    entries = 0
    for start in range(0, len(events), BATCH):
        fields = stream_fields([{k: v for k, v in e.items() if k != "id"} for e in events[start : start + BATCH]])
        pipe.execute_command("XADD", Keys().events, "*", *fields)
        entries += 1
        if entries % 200 == 0:
            pipe.execute()
    pipe.execute()
    client.close()
    return entries


async def drain(url: str, count: int, data_dir: Path) -> float:
    """Seconds the sink takes to write ``count`` waiting events: its first read to its last XACK."""
    redis = Redis.from_url(url)
    sink = Sink(redis, Keys(), SinkSettings(data_dir, batch=10_000 // BATCH, flush=0.2, compact_every=3600))
    task = asyncio.create_task(sink.run())
    while sink.stats.rows < count:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    seconds = sink.stats.last_ack - sink.stats.first_read
    sink.stop()
    await task
    await redis.aclose()
    return seconds


def read_only(url: str, count: int) -> float:
    """Seconds to read and acknowledge ``count`` waiting entries through a consumer group, writing nothing
    and unpacking nothing: the Redis side's ceiling for any sink."""
    client = sync_redis.Redis.from_url(url)
    client.set_response_callback("XREADGROUP", lambda response, **options: response)
    client.xgroup_create(Keys().events, "bench-read", id="0")
    started, got = time.perf_counter(), 0
    while got < count:
        reply = client.xreadgroup("bench-read", "r", {Keys().events: ">"}, count=10_000)
        items = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        client.xack(Keys().events, "bench-read", *[entry_id for entry_id, _ in items])
        got += len(items)
    seconds = time.perf_counter() - started
    client.close()
    return seconds


def raw_insert(rows: list[dict[str, str]]) -> float:
    """Seconds for Arrow table + DuckDB INSERT of the same rows, in batches of the sink's size."""
    con = duckdb.connect()
    con.execute("CREATE TABLE events (id VARCHAR, type VARCHAR, ts BIGINT, flow VARCHAR, execution_id VARCHAR, "
                "node VARCHAR, data VARCHAR, phone VARCHAR)")  # fmt: skip
    parsed = [event_row(fields) for fields in rows]
    started = time.perf_counter()
    for start in range(0, len(parsed), 10_000):
        chunk = parsed[start : start + 10_000]
        table = pa.Table.from_pydict({c: [r[c] for r in chunk] for c in COLUMNS}, schema=SCHEMA)
        con.register("batch", table)
        con.execute("INSERT INTO events SELECT * FROM batch")
        con.unregister("batch")
    seconds = time.perf_counter() - started
    con.close()
    return seconds


def measure(url: str, count: int, rounds: int = 2) -> dict[str, Any]:
    """The best of ``rounds`` sink drains and of ``rounds + 1`` raw inserts, interleaved (a shared
    machine's load comes and goes; the best run is the one least disturbed)."""
    rows = events(count)
    raw = [raw_insert(rows)]
    sink: list[float] = []
    for _ in range(rounds):
        fill(url, rows)
        with tempfile.TemporaryDirectory(prefix="flowchat-sink-bench-") as folder:
            sink.append(asyncio.run(drain(url, count, Path(folder))))
        raw.append(raw_insert(rows))
    entries = fill(url, rows)
    reading = read_only(url, entries)
    sink_rate, raw_rate = count / min(sink), count / min(raw)
    return {
        "events": count,
        "events_per_entry": BATCH,
        "rounds": rounds,
        "stream_read_per_s": count / reading,
        "sink_per_s": sink_rate,
        "raw_arrow_insert_per_s": raw_rate,
        "ratio": sink_rate / raw_rate,
        "sink_runs_per_s": [round(count / s) for s in sink],
        "raw_runs_per_s": [round(count / s) for s in raw],
    }


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
