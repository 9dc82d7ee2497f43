"""flowchat.analytics: read-only SQL over the warehouse, from Python and `flowchat analytics sql`."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from analytics_data import loaded
from support import ROOT, run_cli

from flowchat.analytics import AnalyticsError, check_query, query
from flowchat.sink import Sink
from flowchat.warehouse import Warehouse


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``flowchat ARGS`` with nothing but the data folder set: the analyst's side needs no Redis."""
    return run_cli(*args, env={"FLOWCHAT_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"})


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


def test_sql_query_reads_while_files_change(tmp_path: Path) -> None:
    from flowchat.warehouse import event_row

    warehouse = Warehouse(tmp_path)
    rows = [event_row({"id": "a", "type": "metric", "ts": str(int(time.time() * 1000)), "data": "{}"})]
    warehouse.write(rows, "1")
    columns, result = query(tmp_path / "analytics.duckdb", "SELECT count(*) AS n FROM metrics")
    assert (columns, result) == (["n"], [(1,)])
    warehouse.close()


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
