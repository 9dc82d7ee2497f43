"""Stable JSON for operator listings (``--json``): documented field names, ISO 8601 UTC times.

The README's "JSON output" table lists these names; a test keeps the two equal. Times are
strings like ``2026-11-30T10:46:00.939+00:00`` (null when not reached yet).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

EXECUTION_FIELDS = (
    "id", "flow", "flow_version", "status", "trigger", "created_at", "started_at", "finished_at", "error",
)  # fmt: skip
DEAD_LETTER_FIELDS = ("execution_id", "flow", "node", "code", "message", "dead_at", "entry_id")
QUEUE_STATS_FIELDS = (
    "ready",
    "in_flight",
    "delayed",
    "dead",
    "events",
    "events_age_seconds",
    "flows",
    "memory",
    "counters",
)
FLOW_COUNT_FIELDS = ("succeeded", "failed", "dead", "retried", "cancelled")
MEMORY_FIELDS = (
    "used_memory_bytes", "maxmemory_bytes", "maxmemory_policy", "executions", "bytes_per_live_execution",
    "bytes_per_finished_execution", "executions_per_second", "full_in_seconds",
)  # fmt: skip


def limit(text: str) -> int:
    """``--limit``'s type for every listing: a whole number of rows, 1 or more (argparse names a bad one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def iso(epoch: float | str | None) -> str | None:
    """Epoch seconds (a number, or its text as Redis holds it) as ISO 8601 UTC with milliseconds and offset.

    None and ``""`` (not set) stay None.
    """
    if epoch is None or epoch == "":
        return None
    return datetime.fromtimestamp(float(epoch), UTC).isoformat(timespec="milliseconds")


def execution_record(meta: dict[str, Any]) -> dict[str, Any]:
    record = {name: meta.get(name) for name in EXECUTION_FIELDS}
    for name in ("created_at", "started_at", "finished_at"):
        record[name] = iso(record[name])
    return record


def dead_letter_record(entry: dict[str, str]) -> dict[str, Any]:
    entry_id = entry.get("entry", "")
    millis = entry_id.partition("-")[0]
    return {
        "execution_id": entry.get("e", ""),
        "flow": entry.get("flow", ""),
        "node": entry.get("node", ""),
        "code": entry.get("code", ""),
        "message": entry.get("message", ""),
        "dead_at": iso(int(millis) / 1000) if millis.isdigit() else None,
        "entry_id": entry_id,
    }


def flow_counts(counters: dict[str, int]) -> dict[str, dict[str, int]]:
    """``{"dead:tagger": 2}`` → ``{"tagger": {"succeeded": 0, …, "dead": 2}}``."""
    flows: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        event, _, flow = name.partition(":")
        if event in FLOW_COUNT_FIELDS:
            flows.setdefault(flow, dict.fromkeys(FLOW_COUNT_FIELDS, 0))[event] = int(value)
    return dict(sorted(flows.items()))


def queue_stats_record(stats: dict[str, Any], memory: dict[str, Any] | None) -> dict[str, Any]:
    record = {name: stats.get(name) for name in QUEUE_STATS_FIELDS if name not in ("flows", "memory")}
    record["flows"] = flow_counts(stats.get("counters", {}))
    record["memory"] = memory
    return {name: record[name] for name in QUEUE_STATS_FIELDS}
