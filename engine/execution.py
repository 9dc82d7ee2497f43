"""The state of one execution: one run of one flow version over one trigger payload.

It is plain data, serialisable to JSON, so the same object is the in-process
trace and what the durable queue checkpoints after every node
(:mod:`flowchat.codec` encodes and decodes it).

An execution's status is one of ``queued`` (accepted, not yet picked up), ``running``
(a worker is on it), ``waiting`` (parked until a retry backoff or a ``delay`` is due),
``succeeded``, ``failed`` or ``cancelled`` (by ``flowchat executions cancel`` while it was
queued or waiting); every failed execution has a dead letter.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

NodeStatus = Literal["pending", "ok", "failed", "skipped", "waiting"]
ExecutionStatus = Literal["queued", "running", "waiting", "succeeded", "failed", "cancelled"]
FINISHED_NODE: frozenset[str] = frozenset({"ok", "failed", "skipped"})
FINISHED_EXECUTION: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class NodeRun:
    """What happened to one node of an execution."""

    id: str
    type: str
    status: NodeStatus = "pending"
    attempts: int = 0
    duration_ms: float = 0.0
    output: Any = None
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    wake_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_NODE


@dataclass
class Execution:
    """An execution and its per-node trace."""

    id: str
    flow: str
    flow_version: str
    trigger: dict[str, Any]
    nodes: dict[str, NodeRun]
    status: ExecutionStatus = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, Any] | None = None
    deliveries: int = field(default=0, compare=False)
    """How many times the queue has handed this execution to a worker since it last waited; 0 when it
    did not come from the queue (not stored)."""

    @classmethod
    def new(cls, flow: Any, trigger: dict[str, Any], execution_id: str | None = None) -> Execution:
        """A fresh execution of ``flow`` (a loaded Flow) over ``trigger``."""
        runs = {node.id: NodeRun(node.id, node.type) for node in flow.nodes.values()}
        return cls(execution_id or new_execution_id(), flow.name, flow.version, trigger, runs)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_EXECUTION

    @property
    def wake_at(self) -> float | None:
        waits = [run.wake_at for run in self.nodes.values() if run.status == "waiting" and run.wake_at]
        return min(waits) if waits else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of an execution (see :func:`flowchat.codec.execution_json`)."""
        from flowchat.codec import execution_json  # the codec builds on this module

        return execution_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Execution:
        """Rebuild an execution from :meth:`to_dict`'s shape."""
        from flowchat.codec import execution_from_parts

        nodes = data["nodes"]
        return execution_from_parts(data, nodes, [(node_id, run.get("type", "")) for node_id, run in nodes.items()])


def new_execution_id() -> str:
    """Time-ordered, unique ids: sortable by creation, safe in URLs."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"
