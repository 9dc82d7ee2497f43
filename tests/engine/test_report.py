"""flowchat.report: `flowchat analytics report`, the standard summary over the views."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb
from analytics_data import loaded

from flowchat.report import build_report, format_report
from flowchat.sink import Sink


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
