"""The table: one row per measured number, with its target and PASS/MISS beside it.

Targets are the issue's, for a 2-core machine; they are reported, never enforced.
Each checked target is also written to ``results["targets"]`` as
``{name: {"value", "target", "pass"}}``.
"""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, str]


class Targets:
    """Collects target checks and renders the last column."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.checks: dict[str, dict[str, Any]] = results.setdefault("targets", {})

    def at_least(self, name: str, value: float, target: float, shown: str) -> str:
        return self._check(name, value, target, value >= target, f"≥ {shown}")

    def at_most(self, name: str, value: float, target: float, shown: str) -> str:
        return self._check(name, value, target, value <= target, f"≤ {shown}")

    def paced(self, paced: dict[str, Any]) -> str:
        """Sends held to 80/s (5% for timing), and every execution's message sent: none dropped."""
        ok = paced["sends_per_s"] <= 84 and paced["failed"] == 0 and paced["sent"] == paced["executions"]
        return self._check("crm_paced_80_per_s_none_dropped", paced["sends_per_s"], 80, ok, "≤ 80/s, none dropped")

    def _check(self, name: str, value: float, target: float, ok: bool, shown: str) -> str:
        self.checks[name] = {"value": round(value, 3), "target": target, "pass": ok}
        return f"{shown}  {'PASS' if ok else 'MISS'}"


def rows(results: dict[str, Any]) -> list[Row]:
    t = Targets(results)
    return [*engine_rows(results, t), *crm_rows(results, t), *sink_rows(results, t)]


def sink_rows(results: dict[str, Any], t: Targets) -> list[Row]:
    sink = results.get("sink")
    if not sink:
        return []
    return [
        (
            "analytics sink: stream -> Parquet",
            f"{sink['sink_per_s']:,.0f} events/s",
            f"raw DuckDB Arrow insert {sink['raw_arrow_insert_per_s']:,.0f}/s; "
            f"bare XREADGROUP+XACK {sink.get('stream_read_per_s', 0):,.0f}/s; "
            f"{sink.get('events_per_entry', 1)} events per entry",
            t.at_least("sink_ratio", sink["ratio"], 1 / 3, f"0.33 raw ({sink['ratio']:.2f})"),
        )
    ]


def _ms(result: dict[str, Any]) -> str:
    return f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"


def engine_rows(results: dict[str, Any], t: Targets) -> list[Row]:
    base = results["baseline"]["jobs_per_s"]
    q1, q5, q1x2 = results["queue_noop1"], results["queue_noop5"], results["queue_noop1_2_workers"]
    lead = results["queue_lead_intake"]
    hooks, twilio, lat = results["ingress"], results["ingress_twilio"], results["latency"]
    hooks_ratio = hooks["flowchat"]["rate"] / hooks["bare"]["rate"]
    twilio_ratio = twilio["flowchat"]["rate"] / twilio["bare"]["rate"]
    return [
        ("baseline: bare Redis Streams", f"{base:,.0f} jobs/s", "reference only", ""),
        ("queue: 1-node no-op flow", f"{q1['executions_per_s']:,.0f} exec/s", "", ""),
        ("queue: 5-node no-op flow", f"{q5['executions_per_s']:,.0f} exec/s", "", ""),
        ("queue: 1-node, 2 worker processes", f"{q1x2['executions_per_s']:,.0f} exec/s", "", ""),
        ("queue: lead_intake (4 nodes)", f"{lead['executions_per_s']:,.0f} exec/s", "", ""),
        ("ingress: bare aiohttp + XADD", f"{hooks['bare']['rate']:,.0f} req/s", _ms(hooks["bare"]), ""),
        (
            "ingress: POST /hooks (HMAC)",
            f"{hooks['flowchat']['rate']:,.0f} req/s",
            _ms(hooks["flowchat"]),
            t.at_least("ingress_hooks_ratio", hooks_ratio, 0.70, f"0.70 bare ({hooks_ratio:.2f})"),
        ),
        (
            "ingress (twilio): bare + RequestValidator",
            f"{twilio['bare']['rate']:,.0f} req/s",
            _ms(twilio["bare"]),
            "",
        ),
        (
            "ingress (twilio): POST /twilio/message",
            f"{twilio['flowchat']['rate']:,.0f} req/s",
            _ms(twilio["flowchat"]),
            t.at_least("ingress_twilio_ratio", twilio_ratio, 0.70, f"0.70 bare ({twilio_ratio:.2f})"),
        ),
        (
            "latency: accepted → finished (1 node)",
            _ms(lat),
            f"at {lat['rate_per_s']:,.0f}/s (half of {lat['max_end_to_end_per_s']:,.0f}/s)",
            t.at_most("latency_1node_p99_ms", lat["p99_ms"], 50, "50 ms p99"),
        ),
        (
            "cost: 1-node, worker CPU / exec",
            f"{q1['worker_cpu_us_per_execution']:.0f} µs",
            "stretch ≤ 35 µs" + (" (met)" if q1["worker_cpu_us_per_execution"] <= 35 else ""),
            t.at_most("cost_1node_worker_us", q1["worker_cpu_us_per_execution"], 51, "51 µs"),
        ),
        (
            "cost: 1-node, Redis CPU / exec",
            f"{q1['redis_cpu_us_per_execution']:.0f} µs",
            f"{q1['round_trips_per_execution']:.3f} round trips / exec",
            "",
        ),
        (
            "memory: Redis / queued execution",
            f"{q1['redis_bytes_per_queued']:,.0f} B",
            f"1-node, {q1['executions']:,} queued",
            t.at_most("memory_queued_bytes", q1["redis_bytes_per_queued"], 2048, "2 KB"),
        ),
        (
            "memory: Redis / finished, retained",
            f"{lead['redis_bytes_per_finished']:,.0f} B",
            f"lead_intake (1-node {q1['redis_bytes_per_finished']:,.0f} B); events until read: "
            f"{lead['events_bytes_per_execution']:,.0f} B",
            t.at_most("memory_finished_bytes", lead["redis_bytes_per_finished"], 500, "500 B"),
        ),
        ("memory: worker peak RSS", f"{q1['worker_peak_rss_mb']:.0f} MB", "draining the 1-node queue", ""),
    ]


def crm_rows(results: dict[str, Any], t: Targets) -> list[Row]:
    crm = results.get("crm")
    if not crm:
        return [("crm: not measured", results.get("crm_skipped", "examples/crm.yaml missing"), "", "")]
    out: list[Row] = []
    one, two = crm["outbox_1_worker"], crm["outbox_2_workers"]
    out.append(
        (
            "crm (outbox): 1 worker, pacing off",
            f"{one['executions_per_s']:,.0f} exec/s",
            f"{one['sends']:,} sends recorded",
            t.at_least("crm_outbox_1_worker", one["executions_per_s"], 3000, "3,000/s"),
        )
    )
    out.append(("crm (outbox): 2 workers, pacing off", f"{two['executions_per_s']:,.0f} exec/s", "", ""))
    paced = crm["outbox_paced"]
    out.append(
        (
            "crm (outbox): default pacing 80/s",
            f"{paced['sends_per_s']:,.0f} sends/s",
            f"{paced['sent']:,}/{paced['executions']:,} sent, {paced['deferred']:,} deferred, "
            f"{paced['failed']:,} failed",
            t.paced(paced),
        )
    )
    tw = crm["twilio_1_worker"]
    out.append(
        (
            "crm (twilio): 1 worker, pacing off",
            f"{tw['executions_per_s']:,.0f} exec/s",
            f"{tw['api_requests']:,} API requests to the local fake",
            "",
        )
    )
    lat = crm["latency"]
    out.append(
        (
            "latency: inbound accepted → send",
            _ms(lat),
            f"at {lat['rate_per_s']:,.0f}/s (half of {lat['max_end_to_end_per_s']:,.0f}/s)",
            t.at_most("crm_latency_p99_ms", lat["p99_ms"], 50, "50 ms p99"),
        )
    )
    out.append(
        (
            "cost: CRM, worker CPU / exec",
            f"{one['worker_cpu_us_per_execution']:.0f} µs",
            "",
            t.at_most("cost_crm_worker_us", one["worker_cpu_us_per_execution"], 250, "250 µs"),
        )
    )
    out.append(
        (
            "cost: CRM, Redis CPU / exec",
            f"{one['redis_cpu_us_per_execution']:.0f} µs",
            f"{one['round_trips_per_execution']:.3f} round trips, "
            f"{one.get('commands_per_execution', 0):.1f} commands / exec (worker)",
            t.at_most("cost_crm_redis_us", one["redis_cpu_us_per_execution"], 100, "100 µs"),
        )
    )
    mem = crm["memory"]
    out.append(
        (
            "memory: Redis / contact",
            f"{mem['redis_bytes_per_contact']:,.0f} B",
            f"{mem['contacts']:,} contacts",
            t.at_most("memory_contact_bytes", mem["redis_bytes_per_contact"], 2048, "2 KB"),
        )
    )
    out.append(
        (
            "memory: Redis / queued CRM execution",
            f"{one['redis_bytes_per_queued']:,.0f} B",
            f"events until read: {one['events_bytes_per_execution']:,.0f} B",
            "",
        )
    )
    out.append(
        (
            "memory: Redis / finished CRM execution",
            f"{one.get('execution_bytes_per_finished', 0):,.0f} B",
            f"all the flow leaves: {one['redis_bytes_per_finished']:,.0f} B (message ledger, send record, "
            "contact audit, limiter keys)",
            t.at_most("memory_crm_finished_bytes", one.get("execution_bytes_per_finished", 0), 500, "500 B"),
        )
    )
    return out


def print_table(table: list[Row]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
