"""Operator commands over the queue: list and show executions, dead letters, stats."""

from __future__ import annotations

import time
from typing import Any

from flowchat.execution import Execution
from flowchat.flow import Flow
from flowchat.queue import Queue, execution_from_parts


async def list_executions(queue: Queue, flow: str | None, status: str | None, limit: int) -> list[dict[str, Any]]:
    rows = []
    for meta in await queue.recent(limit * (1 if flow is None and status is None else 20)):
        if (flow is None or meta["flow"] == flow) and (status is None or meta["status"] == status):
            rows.append(meta)
        if len(rows) >= limit:
            break
    return rows


async def load_execution(queue: Queue, execution_id: str) -> Execution | None:
    stored = await queue.get(execution_id)
    if stored is None:
        return None
    meta, nodes = stored
    return execution_from_parts(meta, nodes, [(node_id, str(run.get("type", ""))) for node_id, run in nodes.items()])


async def replay(queue: Queue, execution_id: str, *, latest: dict[str, Flow] | None = None) -> Execution | None:
    """Put a failed execution back on the queue; it resumes at its failed node.

    With ``latest`` (flows by name) it moves to the current version of its flow, so a fix
    made in the flow file applies; nodes that already succeeded are still not run again.
    """
    execution = await load_execution(queue, execution_id)
    if execution is None or execution.status != "failed":
        return None  # only a failed (dead) execution is replayed; anything else is still owned by the queue
    for run in execution.nodes.values():
        if run.status in ("failed", "waiting") or (run.status == "pending" and run.attempts):
            run.status, run.attempts, run.error, run.wake_at, run.finished_at = "pending", 0, None, None, None
    execution.status, execution.error, execution.finished_at = "queued", None, None
    current = (latest or {}).get(execution.flow)
    if current is not None:
        await queue.store_flow(current)
        execution.flow_version = current.version
    if not await queue.requeue(execution):
        return None  # replayed meanwhile by someone else
    await queue.remove_dead_letters(execution_id)
    return execution


def age(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0.0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
