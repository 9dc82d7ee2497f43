"""Operator commands over the queue: list and show executions, replay dead letters."""

from __future__ import annotations

from typing import Any

import yaml

from flowchat.execution import Execution
from flowchat.flow import Flow
from flowchat.queue import Queue, execution_from_parts


async def list_executions(
    queue: Queue, flow: str | None, status: str | None, limit: int, *, since: float | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` executions (of ``flow``, in ``status``, created at ``since`` or later), newest first.

    Read through the per-flow, per-status indexes: it costs what it shows (``limit`` index
    entries from each index it reads, and ``limit`` hashes), whatever the filter. An entry whose
    state has expired before retention trimmed it is skipped, and the next ones read instead.
    """
    if status == "running":
        return await _running(queue, flow, limit, since)
    indexes = await queue.indexes(flow, status)
    rows: list[dict[str, Any]] = []
    offset = 0
    while len(rows) < limit:
        wanted = limit - len(rows)
        ids = [execution_id for execution_id, _ in await queue.newest(indexes, wanted, offset=offset, since=since)]
        rows += await queue.summaries(ids)
        offset += len(ids)
        if len(ids) < wanted:
            break
    return rows


async def _running(queue: Queue, flow: str | None, limit: int, since: float | None) -> list[dict[str, Any]]:
    """Executions a worker holds now (read from the ready stream's pending list, bounded by the workers'
    concurrency), newest first; stored as queued or waiting until their next write, shown as running."""
    rows = [
        {**row, "status": "running"}
        for row in await queue.summaries(await queue.in_flight())
        if row.get("status") not in ("succeeded", "failed", "cancelled")
        and (flow is None or row.get("flow") == flow)
        and (since is None or (row.get("created_at") or 0) >= since)
    ]
    return sorted(rows, key=lambda row: -(row.get("created_at") or 0))[:limit]


async def load_execution(queue: Queue, execution_id: str) -> Execution | None:
    """An execution as stored, its nodes in flow order (see :func:`load_stored` for which form it has)."""
    found = await load_stored(queue, execution_id)
    return None if found is None else found[0]


async def load_stored(queue: Queue, execution_id: str) -> tuple[Execution, bool] | None:
    """An execution as stored, and whether it is the compact form of a succeeded one (no outputs, no trigger)."""
    stored = await queue.stored(execution_id)
    if stored is None:
        return None
    # the nodes that ran, in flow order (the hash keeps no order of its own)
    order = [
        (node_id, node_type) for node_id, node_type in await _node_order(queue, stored.meta) if node_id in stored.nodes
    ]
    return execution_from_parts(stored.meta, stored.nodes, order), stored.compact


async def _node_order(queue: Queue, meta: dict[str, Any]) -> list[tuple[str, str]]:
    """The (id, type) of the nodes of the execution's flow version, in flow order, from the stored YAML."""
    source = await queue.flow_source(str(meta.get("flow")), str(meta.get("flow_version")))
    if source is None:
        return []
    try:
        document = yaml.safe_load(source[1])
        return [(str(node["id"]), str(node.get("type", ""))) for node in document["nodes"]]
    except (yaml.YAMLError, TypeError, KeyError):
        return []  # not a flow we can read any more: stored order


async def replay(
    queue: Queue,
    execution_id: str,
    *,
    latest: dict[str, Flow] | None = None,
    dead_entries: list[str] | None = None,
) -> Execution | None:
    """Put a failed execution back on the queue; it resumes at its failed node.

    With ``latest`` (flows by name) it moves to the current version of its flow, so a fix
    made in the flow file applies; nodes that already succeeded are still not run again.
    ``dead_entries`` are its dead-letter stream entries when the caller has read them already
    (replaying every dead letter reads the stream once, not once per execution).
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
    await queue.remove_dead_letters(execution_id, dead_entries)
    return execution


async def replay_all(queue: Queue, *, latest: dict[str, Flow] | None = None) -> list[str]:
    """Replay every dead-lettered execution, reading the dead-letter stream once."""
    entries: dict[str, list[str]] = {}
    for letter in await queue.dead_letters(1_000_000):
        entries.setdefault(letter["e"], []).append(letter["entry"])
    replayed = []
    for execution_id, ids in entries.items():
        if await replay(queue, execution_id, latest=latest, dead_entries=ids):
            replayed.append(execution_id)
    return replayed
