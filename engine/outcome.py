"""An execution's outcome: the one decision the worker and the queue act on.

After the runner advances an execution as far as it can, :func:`decide` sets the
execution's status and says what the queue must do with it. The worker records it
with :meth:`Queue.finish` (state, acknowledgement, parking or dead letter, and the
cluster-wide counter, in one atomic script) and counts the same ``event`` in its
own metrics; neither looks at node statuses again.

Executions the runner never reached (their flow version is gone, they crashed a
worker too often, a worker hit an unexpected error) get theirs from :func:`dead`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flowchat.execution import Execution

Action = Literal["done", "wait", "dead"]
Event = Literal["succeeded", "failed", "retried", "waiting", "cancelled"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What ``dlq list`` shows: the node, the error code and message."""

    node: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happens to an execution now: finish it (``done``), park it (``wait``) or dead-letter it (``dead``)."""

    execution: Execution
    action: Action
    event: Event
    """Counted per flow, in Redis (``<event>:<flow>``) and in /metrics; ``waiting`` is not counted."""
    dead_letter: DeadLetter | None = None

    @property
    def counter(self) -> str:
        """The cluster-wide counter this outcome increments, or "" for none."""
        return "" if self.event == "waiting" else f"{self.event}:{self.execution.flow}"


def decide(execution: Execution, now: float) -> Outcome:
    """Settle ``execution``'s status from its nodes and decide what the queue does with it."""
    runs = execution.nodes.values()
    failed = next((run for run in runs if run.status == "failed"), None)
    if failed is not None:
        execution.status, execution.error = "failed", {**(failed.error or {}), "node": failed.id}
    elif all(run.finished for run in runs):
        execution.status, execution.error = "succeeded", None
    else:
        execution.status = "waiting"
    if execution.finished:
        execution.finished_at = now
    if execution.status == "failed":
        return _dead_outcome(execution)
    if execution.status == "succeeded":
        return Outcome(execution, "done", "succeeded")
    retrying = any(run.error for run in runs if run.status == "waiting")
    return Outcome(execution, "wait", "retried" if retrying else "waiting")


def cancelled(execution: Execution, now: float) -> Outcome:
    """Stop ``execution`` at a node boundary because an operator cancelled it (``executions cancel``)."""
    execution.status, execution.finished_at = "cancelled", now
    return Outcome(execution, "done", "cancelled")


def dead(execution: Execution, code: str, message: str, node: str = "", now: float | None = None) -> Outcome:
    """Fail ``execution`` for a reason outside its nodes (flow missing, poison, worker error)."""
    execution.status = "failed"
    execution.error = {"code": code, "message": message, "node": node, "retryable": False}
    if now is not None:
        execution.finished_at = now
    return _dead_outcome(execution)


def _dead_outcome(execution: Execution) -> Outcome:
    error = execution.error or {}
    letter = DeadLetter(str(error.get("node") or ""), str(error.get("code", "")), str(error.get("message", "")))
    return Outcome(execution, "dead", "failed", letter)
