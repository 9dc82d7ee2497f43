"""The analytics sink, warehouse and views against a real redis-server and real DuckDB (in process)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest
from analytics_data import ALICE, DAVE, append, bulk, count, known_data_set, physical_rows
from redis.asyncio import Redis
from support import ROOT, wait_for

from flowchat.analytics import AnalyticsError, check_query, query
from flowchat.keys import Keys
from flowchat.report import build_report, format_report
from flowchat.sink import GROUP, Sink, SinkSettings
from flowchat.warehouse import Warehouse, entries_table, phone_hash


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def start_sink(redis: Redis, data_dir: Path) -> AsyncIterator[Callable[..., Sink]]:
    started: list[tuple[Sink, asyncio.Task[None]]] = []

    def start(sink_class: type[Sink] = Sink, **options: Any) -> Sink:
        settings = SinkSettings(data_dir, **{"flush": 0.05, "lease_ttl": 1.0, **options})
        sink = sink_class(redis, Keys(), settings)
        started.append((sink, asyncio.create_task(sink.run())))
        return sink

    yield start
    for sink, task in started:
        sink.stop()
        await asyncio.gather(task, return_exceptions=True)


async def loaded(redis_url: str, start_sink: Callable[..., Sink], data_dir: Path) -> list[dict[str, str]]:
    events = known_data_set()
    append(redis_url, events)
    start_sink()
    await wait_for(lambda: count(data_dir, "SELECT count(*) FROM executions") == 14)
    return events


async def test_views_show_the_recorded_events(redis_url: str, start_sink: Callable[..., Sink], data_dir: Path) -> None:
    await loaded(redis_url, start_sink, data_dir)
    con = duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM node_runs").fetchone() == (26,)
        row = con.execute(
            "SELECT flow, flow_version, trigger_type, status, duration_ms, attempts, error_code, "
            "finished_at - started_at FROM executions WHERE execution_id = 'w3'"
        ).fetchone()
        assert row is not None and row[:7] == ("welcome", "v1", "webhook", "failed", 400, 1, "twilio-63016")
        assert row[7].total_seconds() == 0.4
        messages = dict(con.execute("SELECT sid, status FROM messages").fetchall())
        assert messages == {
            "SM1": "read",
            "SM2": "delivered",
            "SM3": "read",
            "SM4": "failed",
            "SM5": "undelivered",
            "SM6": "sent",
            "SMin1": "received",
        }  # SM7 went to Dave, who is erased
        sm3 = con.execute(
            "SELECT execution_id, flow, node, phone, delivered_at IS NULL, read_at > sent_at, sent_at > queued_at "
            "FROM messages WHERE sid = 'SM3'"
        ).fetchone()
        assert sm3 == ("w3", "welcome", "send", "+14155550103", True, True, True)
        assert con.execute("SELECT error_code FROM messages WHERE sid = 'SM4'").fetchone() == ("twilio-30008",)
        assert con.execute("SELECT sum(value), tags['campaign'] FROM metrics GROUP BY 2 ORDER BY 2").fetchall() == [
            (4.0, "fall"),
            (12.5, "spring"),
        ]
        actions = con.execute("SELECT action, phone, tags FROM contact_events ORDER BY ts").fetchall()
        assert actions[0] == ("tagged", ALICE, ["vip", "spring"])
        assert [a for a, _, _ in actions] == ["tagged", "tagged", "opted_out", "opted_in"]
        assert con.execute("SELECT count(*) FROM contact_events WHERE phone = ?", [DAVE]).fetchone() == (0,)
    finally:
        con.close()


async def test_report_on_the_known_data_set(redis_url: str, start_sink: Callable[..., Sink], data_dir: Path) -> None:
    await loaded(redis_url, start_sink, data_dir)
    con = duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True)
    report = build_report(con, since_seconds=7 * 86400)
    con.close()
    broadcast, welcome = report["flows"]
    assert welcome == {
        "flow": "welcome",
        "executions": 10,
        "succeeded": 8,
        "failed": 2,
        "p50_ms": 550.0,
        "p95_ms": 955.0,
        "success_rate": 0.8,
    }
    assert (broadcast["executions"], broadcast["success_rate"], broadcast["p95_ms"]) == (4, 1.0, 50.0)
    assert report["failing_nodes"] == [
        {
            "flow": "welcome",
            "node": "send",
            "node_type": "whatsapp.send",
            "failures": 2,
            "codes": ["twilio-21211", "twilio-63016"],
        }
    ]
    assert report["messages"] == [
        {
            "flow": "welcome",
            "sent": 5,
            "delivered": 3,
            "read": 2,
            "failed": 2,
            "simulated": 0,
            "delivered_rate": 0.6,
            "read_rate": 0.6667,
        }
    ]
    assert report["message_failures"] == [
        {"error_code": "twilio-30003", "messages": 1},
        {"error_code": "twilio-30008", "messages": 1},
    ]
    assert report["deferred_sends"] == [{"reason": "paced", "deferrals": 2, "executions": 2}]
    assert (report["opt_outs"], report["opt_ins"]) == (1, 1)
    text = format_report(report)
    assert "welcome    10          8          2       80.0%    550 ms  955 ms" in text
    assert "welcome  5     3          2     60.0%           66.7%           2" in text
    assert "Opt-outs: 1   opt-ins: 1" in text
    # the window and the flow filter
    con = duckdb.connect(str(data_dir / "analytics.duckdb"), read_only=True)
    assert build_report(con, since_seconds=60)["flows"] == []
    assert [f["flow"] for f in build_report(con, since_seconds=86400, flow="broadcast")["flows"]] == ["broadcast"]
    con.close()


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"FLOWCHAT_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "flowchat.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


async def test_sql_cli_formats_and_refuses_writes(
    redis_url: str, start_sink: Callable[..., Sink], data_dir: Path, tmp_path: Path
) -> None:
    await loaded(redis_url, start_sink, data_dir)
    sql = "SELECT flow, count(*) AS n, max(finished_at) IS NOT NULL AS ok FROM executions GROUP BY flow ORDER BY flow"
    out = cli(data_dir, "analytics", "sql", sql, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"flow": "broadcast", "n": 4, "ok": True}, {"flow": "welcome", "n": 10, "ok": True}]
    out = cli(data_dir, "analytics", "sql", sql, "--format", "csv")
    assert out.stdout.splitlines() == ["flow,n,ok", "broadcast,4,True", "welcome,10,True"]
    out = cli(data_dir, "analytics", "sql", sql)
    assert out.stdout.splitlines()[0].split() == ["flow", "n", "ok"] and "(2 rows)" in out.stdout
    target = tmp_path / "stolen.csv"
    inside = data_dir / "analytics" / "x.csv"
    out = cli(data_dir, "analytics", "sql", f"COPY executions TO '{target}'")
    assert out.returncode == 2 and "[analytics-sql-refused]" in out.stderr and "Traceback" not in out.stderr
    views = data_dir / "analytics.duckdb"
    for bad in (
        f"COPY executions TO '{target}'",
        f"COPY (SELECT 1) TO '{inside}'",
        "ATTACH ':memory:' AS m",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "CREATE TABLE t AS SELECT 1",
        f"EXPORT DATABASE '{tmp_path}'",
        "SELECT 1; COPY executions TO 'x.csv'",
    ):
        with pytest.raises(AnalyticsError) as refused:
            query(views, bad)
        assert refused.value.code == "analytics-sql-refused", bad
    with pytest.raises(AnalyticsError) as failed:
        query(views, "SELECT * FROM read_csv('/etc/passwd')")  # the sandbox: only the Parquet folder
    assert failed.value.code == "analytics-sql-failed"
    out = cli(data_dir, "analytics", "sql", "SELEC nonsense")
    assert out.returncode == 2 and "[analytics-sql-invalid]" in out.stderr
    assert not target.exists() and not inside.exists()
    out = cli(tmp_path / "nowhere", "analytics", "sql", "SELECT 1")
    assert out.returncode == 2 and "[analytics-missing]" in out.stderr
    out = cli(data_dir, "analytics", "report", "--since", "7d", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["opt_outs"] == 1
    out = cli(data_dir, "analytics", "report", "--since", "soon")
    assert out.returncode == 2 and "[analytics-bad-since]" in out.stderr


def test_check_query_allows_only_queries() -> None:
    check_query("WITH a AS (SELECT 1) SELECT * FROM a; EXPLAIN SELECT 2")
    for bad in ("DETACH x", "CALL pragma_version()", "DELETE FROM t", "PRAGMA enable_profiling"):
        with pytest.raises(AnalyticsError):
            check_query(bad)


async def test_erasure_hides_the_phone_at_once_and_compaction_removes_it(
    redis_url: str, start_sink: Callable[..., Sink], data_dir: Path
) -> None:
    await loaded(redis_url, start_sink, data_dir)
    warehouse = Warehouse(data_dir)
    tomb = warehouse.tombstones()
    assert [t.phone_hash for t in tomb] == [phone_hash(DAVE)] and not tomb[0].purged
    assert DAVE not in (data_dir / "analytics" / "tombstones.json").read_text()
    # hidden in every view that shows phones, still in the Parquet files until compaction
    assert count(data_dir, f"SELECT count(*) FROM messages WHERE phone = '{DAVE}'") == 0
    assert count(data_dir, f"SELECT count(*) FROM contact_events WHERE phone = '{DAVE}'") == 0
    raw = f"SELECT count(*) FROM events WHERE phone = '{DAVE}'"
    assert count(data_dir, raw) == 0
    assert physical_rows(data_dir) == len(known_data_set())
    assert warehouse.compact() >= 1
    assert physical_rows(data_dir) == len(known_data_set()) - 4  # created, two message events, erased
    assert warehouse.tombstones()[0].purged
    assert count(data_dir, "SELECT count(*) FROM messages") == 7
    # a contact who comes back after erasure is recorded again
    from analytics_data import Recorder

    later = Recorder(hours_ago=0)
    later.add("contact", {"action": "created", "phone": DAVE})
    append(redis_url, later.events)
    await wait_for(lambda: count(data_dir, f"SELECT count(*) FROM contact_events WHERE phone = '{DAVE}'") == 1)
    warehouse.close()


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


def test_retention_removes_old_days(tmp_path: Path) -> None:
    from flowchat.warehouse import event_row

    warehouse = Warehouse(tmp_path)
    now = int(time.time() * 1000)
    rows = [
        event_row({"id": f"e{d}", "type": "metric", "ts": str(now - d * 86_400_000), "data": '{"name":"x","value":1}'})
        for d in (0, 2, 5, 9)
    ]
    warehouse.write(rows, "1-0")
    assert len(warehouse.files()) == 4
    assert warehouse.expire(0, now) == 0
    assert warehouse.expire(3, now) == 2
    assert count(tmp_path, "SELECT count(*) FROM metrics") == 2
    warehouse.close()


def test_compaction_merges_small_files_once_per_event(tmp_path: Path) -> None:
    from flowchat.warehouse import event_row

    warehouse = Warehouse(tmp_path)
    now = int(time.time() * 1000)
    for batch in range(6):
        rows = [
            event_row({"id": f"e{batch}-{i}", "type": "metric", "ts": str(now + i), "data": '{"name":"x","value":1}'})
            for i in range(100)
        ]
        warehouse.write(rows, f"{batch}-0")
    warehouse.write(rows, "5-0-again")  # a batch written twice
    assert len(warehouse.files()) == 7 and physical_rows(tmp_path) == 700
    assert count(tmp_path, "SELECT count(*) FROM metrics") == 600
    assert warehouse.compact(min_files=4) == 7
    assert len(warehouse.files()) == 1 and physical_rows(tmp_path) == 600
    assert warehouse.compact(min_files=4) == 0
    warehouse.close()


def test_sql_query_reads_while_files_change(tmp_path: Path) -> None:
    from flowchat.warehouse import event_row

    warehouse = Warehouse(tmp_path)
    rows = [event_row({"id": "a", "type": "metric", "ts": str(int(time.time() * 1000)), "data": "{}"})]
    warehouse.write(rows, "1")
    columns, result = query(tmp_path / "analytics.duckdb", "SELECT count(*) AS n FROM metrics")
    assert (columns, result) == (["n"], [(1,)])
    warehouse.close()


def test_entries_table_takes_any_field_order_and_odd_values() -> None:
    ordered = [b"id", b"a", b"type", b"metric", b"ts", b"5", b"flow", b"f", b"execution_id", b"x", b"node", b"n"]
    table = entries_table(
        [
            [*ordered, b"data", b'{"name": "m", "value": 1}'],
            [b"type", b"contact", b"id", b"b", b"data", b'{"action": "created", "phone": "+14155550100"}'],
            [b"id", b"c", b"type", b"message", b"ts", b"soon", b"data", b"not json"],
            [b"id", b"\xff\xfe", b"type", b"node_run", b"ts", b"7"],
        ]
    )
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c", "\ufffd\ufffd"]
    assert [r["ts"] for r in rows] == [5, 0, 0, 7]
    assert rows[1]["phone"] == "+14155550100" and rows[1]["flow"] == "" and rows[2]["phone"] is None
    assert rows[3]["data"] == "{}"


def test_node_runs_carried_by_execution_and_node_runs_entries_become_node_run_rows() -> None:
    def fields(kind: str, data: dict[str, Any]) -> list[bytes]:
        names = (b"id", b"type", b"ts", b"flow", b"execution_id", b"node", b"data")
        values = (b"", kind.encode(), b"9", b"crm", b"x1", b"", json.dumps(data).encode())
        return [item for pair in zip(names, values, strict=True) for item in pair]

    run = {"node_type": "set", "status": "ok", "attempt": 1, "started_at": 8, "duration_ms": 0.5, "error_code": ""}
    entries = [
        fields("node_runs", {"runs": [{**run, "node": "a"}, {**run, "node": "b"}]}),
        fields("execution", {"status": "succeeded", "runs": [{**run, "node": "c"}]}),
    ]
    first = entries_table(entries, [b"1-0", b"2-0"]).to_pylist()
    again = entries_table(entries, [b"1-0", b"2-0"]).to_pylist()  # the same entries read again: the same rows
    assert first == again
    assert [(r["type"], r["node"], r["id"]) for r in first] == [
        ("node_run", "a", "stream-1-0:0"),
        ("node_run", "b", "stream-1-0:1"),
        ("execution", "", "stream-2-0"),
        ("node_run", "c", "stream-2-0:0"),
    ]
    assert json.loads(first[2]["data"]) == {"status": "succeeded"}  # the runs are not kept twice
    assert json.loads(first[0]["data"]) == {k: v for k, v in run.items()}


README_QUERY = re.compile(r"<!-- query: (\w+) -->\n```sql\n(.*?)```", re.S)


async def test_the_readme_queries_answer_on_recorded_data(
    redis_url: str, start_sink: Callable[..., Sink], data_dir: Path
) -> None:
    await loaded(redis_url, start_sink, data_dir)
    queries = dict(README_QUERY.findall((ROOT / "README.md").read_text()))
    assert len(queries) >= 5
    views = data_dir / "analytics.duckdb"
    answers = {name: query(views, sql)[1] for name, sql in queries.items()}
    # the data set spans two hours, so a day boundary may split it: compare the sums over days
    assert [sum(column) for column in list(zip(*answers["funnel_by_day"], strict=True))[1:]] == [5, 3, 2, 2]
    assert answers["failure_codes_by_flow"] == [("welcome", "twilio-21211", 1), ("welcome", "twilio-63016", 1)]
    slowest = answers["slowest_nodes"][0]
    assert slowest[:4] == ("welcome", "send", "whatsapp.send", 8) and slowest[5] == 49.0
    assert answers["tags_of_repliers"] == [("spring", 1), ("vip", 1)]
    assert answers["metric_sums_by_tag"] == [("order_value", "fall", 4.0, 1), ("order_value", "spring", 12.5, 2)]
    assert [sum(column) for column in list(zip(*answers["opt_outs_by_day"], strict=True))[1:]] == [1, 1]


async def test_hostile_entries_neither_stop_the_sink_nor_break_the_views(
    redis_url: str, redis: Redis, start_sink: Callable[..., Sink], data_dir: Path
) -> None:
    good = bulk(10)
    hostile: list[dict[Any, Any]] = [
        {"junk": "no contract fields at all"},
        {"id": "bad-json", "type": "execution", "ts": "1", "data": "{not json"},
        {"id": "bad-ts", "type": "metric", "ts": "yesterday", "data": '{"name": "m", "value": "NaN?"}'},
        {"id": b"\xff\xfe", "type": "contact", "data": b'{"action": "created", "phone": "\xff"}'},
        {"id": "array", "type": "node_run", "ts": "2", "data": "[1, 2]"},
        {"id": "unknown", "type": "mystery", "ts": "3", "data": "{}"},
        {"type": "metric", "data": '{"name": "no id", "value": 1}'},
        {"type": "metric", "data": '{"name": "no id either", "value": 2}'},
    ]
    for fields in hostile:
        await redis.xadd(Keys().events, fields)
    append(redis_url, good)
    sink = start_sink()
    await wait_for(lambda: sink.stats.events == len(good) + len(hostile))
    assert count(data_dir, "SELECT count(*) FROM node_runs WHERE flow = 'load'") == 10
    assert count(data_dir, "SELECT count(*) FROM events") == 18
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
    assert count(data_dir, "SELECT count(*) FROM metrics") == 0


def test_sink_with_analytics_off_has_nothing_to_do(tmp_path: Path) -> None:
    env = {"FLOWCHAT_DATA_DIR": str(tmp_path), "FLOWCHAT_ANALYTICS": "off", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "flowchat.cli", "sink"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "analytics is off" in out.stdout
