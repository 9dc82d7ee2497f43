"""Analysts' side of the warehouse: read-only SQL over ``analytics.duckdb``, and the CLI.

``flowchat analytics sql "SELECT ..."`` opens the views file read-only, sandboxed to the Parquet
folder (no other file can be read or written, no extension installed or loaded, settings locked)
and accepts only queries (SELECT, EXPLAIN) — so COPY, ATTACH, INSTALL, EXPORT and writes are
refused before they run. ``flowchat analytics report`` prints the standard summary
(:mod:`flowchat.report`), and ``flowchat sink`` runs the sink alone (:mod:`flowchat.sink`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import decimal
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowchat.durations import parse_duration
from flowchat.errors import FlowChatError
from flowchat.settings import Settings

if TYPE_CHECKING:
    import duckdb

ALLOWED = ("SELECT", "EXPLAIN")


class AnalyticsError(FlowChatError):
    """A refused or failed analytics query, or a missing warehouse."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code, retryable=False)


def views_path(settings: Settings) -> Path:
    return settings.data_dir / "analytics.duckdb"


def connect(path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only, sandboxed connection to the views file (any number may be open beside the sink)."""
    import duckdb

    if not path.exists():
        raise AnalyticsError(
            "analytics-missing", f"{path} does not exist yet: start `flowchat serve` or `flowchat sink` first"
        )
    con = duckdb.connect(
        str(path), read_only=True, config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
    )
    folder = str((path.parent / "analytics").resolve()).replace("'", "''")
    con.execute(f"SET allowed_directories=['{folder}/']")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
    return con


def check_query(sql: str) -> None:
    """Refuse anything but queries: COPY, ATTACH, INSTALL, LOAD, SET, EXPORT, CREATE, ..."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise AnalyticsError("analytics-sql-invalid", str(exc).splitlines()[0]) from exc
    if not statements:
        raise AnalyticsError("analytics-sql-invalid", "no statement given")
    for statement in statements:
        kind = statement.type.name
        if kind not in ALLOWED:
            raise AnalyticsError("analytics-sql-refused", f"only queries are allowed here, not {kind}")


def query(path: Path, sql: str, tries: int = 3) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run read-only SQL against the views; the last statement's columns and rows.

    A compaction may remove a file between a query finding it and reading it: that query is run
    again (the files it finds then hold the same rows).
    """
    import duckdb

    check_query(sql)
    for attempt in range(tries):
        con = connect(path)
        try:
            statements = duckdb.extract_statements(sql)
            for statement in statements[:-1]:
                con.execute(statement)
            cursor = con.execute(statements[-1])
            columns = [d[0] for d in cursor.description or []]
            return columns, cursor.fetchall()
        except duckdb.IOException as exc:
            if attempt + 1 == tries:
                raise AnalyticsError("analytics-sql-failed", str(exc).splitlines()[0]) from exc
        except duckdb.Error as exc:
            raise AnalyticsError("analytics-sql-failed", str(exc).splitlines()[0]) from exc
        finally:
            con.close()
    raise AssertionError("unreachable")


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def render(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str) -> str:
    """Rows as an aligned table, CSV, or JSON (a list of objects keyed by column name)."""
    if fmt == "json":
        return json.dumps([dict(zip(columns, (_plain(v) for v in row), strict=True)) for row in rows], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if v is None else _cell(v) for v in row])
        return out.getvalue().rstrip("\n")
    return table(columns, rows)


def _cell(value: Any) -> str:
    plain = _plain(value)
    return json.dumps(plain) if isinstance(plain, list | dict) else str(plain)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("" if v is None else _cell(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(columns)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


# --- commands ----------------------------------------------------------------------------


def sql_command(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        columns, rows = query(views_path(settings), args.sql)
    except AnalyticsError as exc:
        print(f"error: [{exc.code}] {exc.message}", file=sys.stderr)
        return 2
    print(render(columns, rows, args.format))
    return 0


def report_command(args: argparse.Namespace) -> int:
    from flowchat.report import build_report, format_report

    settings = Settings.from_env()
    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        print(f"error: [analytics-bad-since] --since {args.since!r}: {exc}", file=sys.stderr)
        return 2
    try:
        con = connect(views_path(settings))
    except AnalyticsError as exc:
        print(f"error: [{exc.code}] {exc.message}", file=sys.stderr)
        return 2
    try:
        report = build_report(con, since_seconds=since, flow=args.flow)
    finally:
        con.close()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def sink_command(args: argparse.Namespace) -> int:

    from flowchat.daemon import run

    return run(run_sink_alone(Settings.from_env(), args.parent_pid))


async def run_sink_alone(settings: Settings, parent_pid: int | None = None) -> int:
    """``flowchat sink``: the sink without ingress or workers, until SIGTERM/SIGINT (or ``parent_pid`` exits)."""
    import asyncio
    import signal

    from flowchat.connections import open_redis, queue_keys
    from flowchat.sink import Sink, SinkSettings, run_sink

    if not settings.analytics:
        print("flowchat: analytics is off (FLOWCHAT_ANALYTICS=off); the sink has nothing to do", flush=True)
        return 0
    async with open_redis(settings) as redis:
        sink = Sink(redis, queue_keys(settings), SinkSettings.from_settings(settings))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sink.stop)
        print(f"flowchat: sink {sink.owner} writing {settings.data_dir / 'analytics'}", flush=True)
        orphaned = asyncio.create_task(_stop_when_orphaned(sink, parent_pid)) if parent_pid else None
        try:
            await run_sink(sink)
        finally:
            if orphaned is not None:
                orphaned.cancel()
    return 0


async def _stop_when_orphaned(sink: Any, parent_pid: int, every: float = 1.0) -> None:
    """Stop ``sink`` once the process that started it is gone (``serve`` killed without a chance to stop it)."""
    import asyncio
    import logging
    import os

    while os.getppid() == parent_pid:
        await asyncio.sleep(every)
    logging.getLogger("flowchat.sink").warning("the serve process %d is gone; stopping the sink", parent_pid)
    sink.stop()


def add_commands(sub: Any) -> None:
    """Add ``analytics`` and ``sink`` to the CLI, each with its handler."""
    p = sub.add_parser("analytics", help="query the analytics views (read-only) and print reports")
    p.set_defaults(handler=_analytics)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("sql", help="run a read-only query", description="Run a read-only SQL query on the views.")
    a.add_argument("sql", help='e.g. "SELECT flow, count(*) FROM executions GROUP BY flow"')
    a.add_argument("--format", choices=("table", "csv", "json"), default="table")
    a = actions.add_parser("report", help="per-flow summary", description="Executions, failures, messages, opt-outs.")
    a.add_argument("--since", default="7d", help="window, e.g. 24h, 7d (default 7d)")
    a.add_argument("--flow", help="only this flow")
    a.add_argument("--json", action="store_true")
    p = sub.add_parser(
        "sink", help="run only the analytics sink (events stream -> Parquet); one per deployment is active"
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        metavar="PID",
        help="stop when process PID exits (serve starts its sink with this)",
    )
    p.set_defaults(handler=sink_command)


def _analytics(args: argparse.Namespace) -> int:
    return sql_command(args) if args.action == "sql" else report_command(args)
