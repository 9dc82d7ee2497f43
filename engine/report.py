"""``flowchat analytics report``: the standard summary, as plain SQL over the views.

Per flow: executions, success rate and p50/p95 duration; the nodes that fail most with their
error codes; the outbound message funnel sent → delivered → read with rates and failures by
error code; deferred sends (``whatsapp.send`` runs that were retried: paced or a retryable
Twilio answer); opt-outs and opt-ins. A message counts as delivered when it reached delivered
or read (Twilio may skip the delivered callback), as sent when it reached sent or beyond.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb

EXECUTIONS = """
SELECT flow, count(*) AS executions, count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       quantile_cont(duration_ms, 0.5) AS p50_ms, quantile_cont(duration_ms, 0.95) AS p95_ms
FROM executions WHERE finished_at >= $since AND ($flow IS NULL OR flow = $flow)
GROUP BY flow ORDER BY flow"""

FAILING_NODES = """
SELECT flow, node, any_value(node_type) AS node_type, count(*) AS failures,
       list(DISTINCT coalesce(error_code, 'unknown') ORDER BY coalesce(error_code, 'unknown')) AS codes
FROM node_runs WHERE status = 'failed' AND ts >= $since AND ($flow IS NULL OR flow = $flow)
GROUP BY flow, node ORDER BY failures DESC, flow, node LIMIT 10"""

FUNNEL = """
SELECT coalesce(flow, '') AS flow,
       count(*) FILTER (WHERE coalesce(sent_at, delivered_at, read_at) IS NOT NULL) AS sent,
       count(*) FILTER (WHERE coalesce(delivered_at, read_at) IS NOT NULL) AS delivered,
       count(*) FILTER (WHERE read_at IS NOT NULL) AS read,
       count(*) FILTER (WHERE status IN ('failed', 'undelivered')) AS failed,
       count(*) FILTER (WHERE status = 'simulated') AS simulated
FROM messages WHERE direction = 'outbound' AND first_at >= $since AND ($flow IS NULL OR flow = $flow)
GROUP BY ALL ORDER BY flow"""

FAILURE_CODES = """
SELECT coalesce(error_code, 'unknown') AS error_code, count(*) AS messages
FROM messages WHERE direction = 'outbound' AND status IN ('failed', 'undelivered')
  AND first_at >= $since AND ($flow IS NULL OR flow = $flow)
GROUP BY ALL ORDER BY messages DESC, error_code"""

DEFERRED = """
SELECT coalesce(error_code, 'paced') AS reason, count(*) AS deferrals, count(DISTINCT execution_id) AS executions
FROM node_runs WHERE node_type = 'whatsapp.send' AND status = 'retried' AND ts >= $since
  AND ($flow IS NULL OR flow = $flow)
GROUP BY ALL ORDER BY deferrals DESC, reason"""

CONSENT = """
SELECT count(*) FILTER (WHERE action = 'opted_out') AS opted_out, count(*) FILTER (WHERE action = 'opted_in') AS opted_in
FROM contact_events WHERE ts >= $since AND ($flow IS NULL OR flow = $flow)"""


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params)
    columns = [d[0] for d in cursor.description or []]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def build_report(
    con: duckdb.DuckDBPyConnection, since_seconds: float, flow: str | None = None, now: dt.datetime | None = None
) -> dict[str, Any]:
    """The report as plain data (the ``--json`` output)."""
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    since = now - dt.timedelta(seconds=since_seconds)
    params: dict[str, Any] = {"since": since, "flow": flow}
    flows = _rows(con, EXECUTIONS, params)
    for row in flows:
        row["success_rate"] = _rate(row["succeeded"], row["executions"])
    funnel = _rows(con, FUNNEL, params)
    for row in funnel:
        row["delivered_rate"] = _rate(row["delivered"], row["sent"])
        row["read_rate"] = _rate(row["read"], row["delivered"])
    consent = _rows(con, CONSENT, params)[0]
    return {
        "since": since.isoformat(timespec="seconds"),
        "flow": flow,
        "flows": flows,
        "failing_nodes": _rows(con, FAILING_NODES, params),
        "messages": funnel,
        "message_failures": _rows(con, FAILURE_CODES, params),
        "deferred_sends": _rows(con, DEFERRED, params),
        "opt_outs": consent["opted_out"],
        "opt_ins": consent["opted_in"],
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def format_report(report: dict[str, Any]) -> str:
    """The report as text sections."""
    from flowchat.analytics import table

    title = f"FlowChat analytics since {report['since']} UTC" + (f", flow {report['flow']}" if report["flow"] else "")
    out = [title, "", "Executions by flow"]
    out.append(
        table(
            ["flow", "executions", "succeeded", "failed", "success", "p50", "p95"],
            [
                (
                    r["flow"],
                    r["executions"],
                    r["succeeded"],
                    r["failed"],
                    _pct(r["success_rate"]),
                    _ms(r["p50_ms"]),
                    _ms(r["p95_ms"]),
                )
                for r in report["flows"]
            ],
        )
    )
    out += ["", "Nodes that fail most"]
    out.append(
        table(
            ["flow", "node", "type", "failures", "codes"],
            [
                (r["flow"], r["node"], r["node_type"], r["failures"], ", ".join(r["codes"]))
                for r in report["failing_nodes"]
            ],
        )
    )
    out += ["", "Messages (outbound): sent -> delivered -> read"]
    out.append(
        table(
            ["flow", "sent", "delivered", "read", "delivered/sent", "read/delivered", "failed", "simulated"],
            [
                (
                    r["flow"] or "-",
                    r["sent"],
                    r["delivered"],
                    r["read"],
                    _pct(r["delivered_rate"]),
                    _pct(r["read_rate"]),
                    r["failed"],
                    r["simulated"],
                )
                for r in report["messages"]
            ],
        )
    )
    out += ["", "Message failures by error code"]
    out.append(
        table(["error_code", "messages"], [(r["error_code"], r["messages"]) for r in report["message_failures"]])
    )
    out += ["", "Deferred sends (paced or retried)"]
    out.append(
        table(
            ["reason", "deferrals", "executions"],
            [(r["reason"], r["deferrals"], r["executions"]) for r in report["deferred_sends"]],
        )
    )
    out += ["", f"Opt-outs: {report['opt_outs']}   opt-ins: {report['opt_ins']}"]
    return "\n".join(out)
