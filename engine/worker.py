"""Workers: take executions off the queue and run them with the shared Runner.

A worker reads up to ``concurrency`` entries at a time, fetches their state in
one round trip, runs each execution as a task, and renews the leases of what it
is running. It also takes over entries whose lease expired (moving delayed work that
has come due is :mod:`flowchat.mover`'s job). On stop it takes no more work and lets in-flight
executions finish for up to a grace period; what is left stays leased and is
taken over by another worker once the lease expires.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flowchat.backoff import REDIS, Backoff, retrying
from flowchat.catalog import Catalog
from flowchat.errors import FlowChatError, QueueError
from flowchat.events import Events, execution_event, node_run, node_runs_event
from flowchat.execution import FINISHED_EXECUTION, Execution, NodeRun
from flowchat.flow import Flow, FlowNode
from flowchat.metrics import Metrics
from flowchat.mover import DelayedMover  # re-exported: it lived here before flowchat.mover
from flowchat.outcome import Outcome, cancelled, dead
from flowchat.queue import Delivery, Queue, StoredExecution, execution_from_parts
from flowchat.runner import Runner
from flowchat.services import Services
from flowchat.settings import Settings

__all__ = ["Backoff", "DelayedMover", "Worker", "WorkerSettings"]

log = logging.getLogger("flowchat.worker")
_execution_log = logging.getLogger("flowchat.execution")
_ARROWS = {"succeeded": "←", "failed": "!", "waiting": "↻"}


@dataclass
class WorkerSettings:
    """How one worker runs: slots, lease timing, shutdown grace, and its consumer name."""

    concurrency: int = 32
    visibility_timeout: float = 30.0
    block_ms: int = 1000
    grace: float = 30.0
    max_output: int = 1024 * 1024
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> WorkerSettings:
        """Worker settings from the process's :class:`Settings`, with some fields overridden."""
        values: dict[str, Any] = {
            "visibility_timeout": settings.visibility_timeout,
            "grace": settings.grace,
            "max_output": settings.max_output,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class Worker:
    """Runs executions from the queue until stopped."""

    def __init__(
        self,
        queue: Queue,
        catalog: Catalog,
        services: Services,
        settings: WorkerSettings,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue = queue
        self.catalog = catalog
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.runner = Runner(
            services,
            checkpoint=self._checkpoint,
            confirm=self._confirm,
            defer_waits=True,
            max_output=settings.max_output,
        )
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self._unsaved: dict[str, list[NodeRun]] = {}
        self._writes: dict[str, list[_Write]] = {}  # checkpoints issued, their answers not yet seen
        self.events: Events | None = services.extra.get("events")
        self._events: dict[str, list[dict[str, Any]]] = {}  # node runs riding the next write's event
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await retrying(self.queue.setup, self._stopping)
        loops = [
            asyncio.create_task(self._read_loop(), name="read"),
            asyncio.create_task(self._lease_loop(), name="leases"),
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
        ]
        await self._stopping.wait()
        leases = loops.pop(1)  # keep renewing leases while in-flight work drains
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await self._drain()
        leases.cancel()
        await asyncio.gather(leases, return_exceptions=True)

    async def _drain(self) -> None:
        if not self.in_flight:
            return
        log.info("draining %d in-flight execution(s) for up to %.0fs", len(self.in_flight), self.settings.grace)
        _, pending = await asyncio.wait(list(self.in_flight.values()), timeout=self.settings.grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("%d execution(s) left to be taken over after their lease expires", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    # --- loops ------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            free = self.settings.concurrency - len(self.in_flight)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            if free < self.settings.concurrency // 4:
                await asyncio.sleep(0.001)  # let a few more finish: one read for several slots
                free = self.settings.concurrency - len(self.in_flight)
            try:
                deliveries = await self.queue.read(self.settings.consumer, free, self.settings.block_ms)
                if deliveries:
                    await self._dispatch(deliveries)
                backoff.reset()
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("the consumer group is gone (Redis flushed or lost its data); recreating it")
                    await retrying(self.queue.setup, self._stopping)
                else:  # OOM, READONLY after a failover, …: transient from here
                    await backoff.wait(f"reading the queue: {exc}")
            except (RedisError, OSError) as exc:
                await backoff.wait(f"reading the queue: {exc}")
            except Exception:
                log.exception("unexpected error reading the queue; retrying")
                await backoff.wait("unexpected error")

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.visibility_timeout / 3)
            try:
                lost = await self.queue.extend(self.settings.consumer, list(self.in_flight))
            except (RedisError, OSError) as exc:
                REDIS.failed(f"cannot renew leases: {exc}", self.settings.visibility_timeout / 3)
                continue
            for message_id in lost:
                task = self.in_flight.get(message_id)
                if task is not None:
                    log.error("lease on %s was taken over by another worker; stopping our copy", message_id)
                    task.cancel()

    async def _reclaim_loop(self) -> None:
        idle_ms = int(self.settings.visibility_timeout * 1000)
        while True:
            await asyncio.sleep(max(0.2, self.settings.visibility_timeout / 2))
            free = self.settings.concurrency - len(self.in_flight)
            if free <= 0:
                continue
            try:
                stale = [
                    d
                    for d in await self.queue.reclaim(self.settings.consumer, idle_ms, free)
                    if d.message_id not in self.in_flight
                ]
                if stale:
                    log.warning("taking over %d execution(s) whose lease expired", len(stale))
                    await self._dispatch(stale)
            except (RedisError, OSError) as exc:
                REDIS.failed(f"cannot reclaim stalled work: {exc}", self.settings.visibility_timeout / 2)
            except Exception:
                log.exception("unexpected error reclaiming stalled work")

    # --- one execution ------------------------------------------------------------

    async def _dispatch(self, deliveries: list[Delivery]) -> None:
        for loaded in await self.queue.load(deliveries):
            task = asyncio.create_task(self._execute(loaded))
            self.in_flight[loaded.delivery.message_id] = task
            task.add_done_callback(functools.partial(self._release, loaded.delivery.message_id))

    def _release(self, message_id: str, _: object = None) -> None:
        self.in_flight.pop(message_id, None)
        self._slot_free.set()

    async def _execute(self, loaded: StoredExecution) -> None:
        """Run one delivered execution to its outcome and record it.

        Only Redis being unreachable leaves the entry for take-over (its lease expires and
        a worker resumes it at its first unfinished node); any other error fails the
        execution now, with its cause, so nothing is run again because of it.
        """
        delivery = loaded.delivery
        job = _Job(delivery)
        try:
            outcome = await self._advance(loaded, job)
            if outcome is not None:
                await self._record(outcome, delivery)
        except ExecutionCancelled:
            await self._stop_cancelled(job)
        except Exception as exc:
            if redis_unreachable(exc):
                log.warning("%s left for take-over (Redis unreachable): %s", delivery.execution_id, exc)
            else:
                await self._fail_unexpectedly(job, exc)
        finally:  # also when cancelled (lease lost, or shutdown past the grace period)
            self._unsaved.pop(delivery.execution_id, None)
            self._events.pop(delivery.execution_id, None)
            _forget(self._writes.pop(delivery.execution_id, ()))

    async def _stop_cancelled(self, job: _Job) -> None:
        """An operator cancelled this execution: stop at this node boundary and record it once."""
        stored = await self.queue.get(job.delivery.execution_id)
        if stored is not None and stored[0]["status"] == "cancelled":  # cancelled (and counted) while queued
            await self.queue.drop_delivery(job.delivery)
        elif job.execution is not None:
            await self._record(cancelled(job.execution, time.time()), job.delivery)
        log.info("%s cancelled by an operator; stopped at a node boundary", job.delivery.execution_id)

    async def _advance(self, loaded: StoredExecution, job: _Job) -> Outcome | None:
        """Decode, check and run the execution; its outcome, or None when there is nothing to record."""
        delivery, meta = loaded.delivery, loaded.meta
        if meta is None:
            log.error("%s has no stored state; dropping its queue entry", delivery.execution_id)
            await self.queue.drop_delivery(delivery)
            return None
        if meta.get("status") in FINISHED_EXECUTION:  # cancelled while queued, or a stale copy: its entry just goes
            log.info("%s was %s; dropping its queue entry", delivery.execution_id, meta["status"])
            await self.queue.drop_delivery(delivery)
            return None
        flow = await self.catalog.flow_at(meta["flow"], meta["flow_version"], self.queue.flow_source)
        execution = execution_from_parts(meta, loaded.nodes, _order(flow, loaded.nodes))
        execution.deliveries = loaded.deliveries
        job.flow, job.execution = flow, execution
        if flow is None:
            message = f"flow {meta['flow']} version {meta['flow_version']} is not available"
            return dead(execution, "flow-missing", message, now=time.time())
        if loaded.deliveries > self.queue.max_deliveries:
            return _poison(flow, execution, loaded.deliveries)
        if execution.started_at is None:
            self.metrics.execution_event(flow.name, "started")
        return await self.runner.advance(flow, execution)

    async def _record(self, outcome: Outcome, delivery: Delivery) -> None:
        """Write the outcome with the node states not yet saved, in the queue's one atomic finish."""
        execution = outcome.execution
        if outcome.action == "dead":
            letter = outcome.dead_letter
            if letter and letter.code in _WORKER_CODES:
                log.error("%s dead-lettered: [%s] %s", execution.id, letter.code, letter.message)
        if _execution_log.isEnabledFor(logging.INFO):
            _log_outcome(execution)
        if outcome.event != "waiting":
            self.metrics.execution_event(execution.flow, outcome.event)
        # an execution that finished before a boundary saw the cancel flag keeps its outcome
        await self._confirm(execution, cancellable=not execution.finished)
        runs = self._unsaved.pop(execution.id, ())
        self._send_events(execution, final=True)  # queued now: leaves in the same write as the outcome
        if not await self.queue.finish(delivery, outcome, self.settings.consumer, runs=runs):
            log.error("%s: lease lost before finishing; the worker that took it over owns the outcome", execution.id)

    async def _fail_unexpectedly(self, job: _Job, exc: Exception) -> None:
        """Dead-letter an execution after an error that is not its nodes' (a bug, an unstorable state)."""
        execution_id = job.delivery.execution_id
        self.metrics.crashes += 1  # flowchat_worker_task_crashes_total
        log.error("%s failed in the worker: %s: %s", execution_id, type(exc).__name__, exc, exc_info=exc)
        if job.execution is None:
            return  # its state could not even be read: nothing to record it on; left for take-over
        node = _error_node(exc) or _running_node(job.flow, job.execution)
        if isinstance(exc, FlowChatError):
            code, message = exc.code, exc.message
        else:
            code, message = "worker-error", f"{type(exc).__name__}: {exc}"
        outcome = dead(job.execution, code, message, node, now=time.time())
        unsaved = self._unsaved.pop(execution_id, [])
        for runs in (unsaved, []):  # again without the node states, in case they were what failed
            self._unsaved[execution_id] = runs
            try:
                await self._record(outcome, job.delivery)
                return
            except Exception as again:
                if redis_unreachable(again):
                    break
                log.error("%s: cannot record the failure: %s: %s", execution_id, type(again).__name__, again)
        log.critical("%s: the failure could not be recorded; left for take-over", execution_id)

    async def _checkpoint(self, execution: Execution, run: NodeRun, node: FlowNode) -> None:
        """Persist a settled node before anything downstream of it can run.

        Two kinds of node state ride along with a later write instead of costing a round
        trip of their own: the last node's (written atomically with the outcome) and that of
        pure and idempotent nodes, which a crash may make run again harmlessly.
        """
        if run.finished or run.status == "waiting":
            self.metrics.node_ran(run.type, run.status, run.duration_ms / 1000)
            if self.events is not None and self.events.enabled and (run.finished or run.error):
                self._events.setdefault(execution.id, []).append(node_run(run))
        unsaved = self._unsaved.setdefault(execution.id, [])
        unsaved.append(run)
        if _may_defer(run, node) or all(other.finished for other in execution.nodes.values()):
            return
        del self._unsaved[execution.id]
        self._send_events(execution)
        # issued now, answer awaited in _confirm: before the next node whose effect must not repeat
        # starts, and before the outcome (nothing this execution writes later can overtake it)
        write = _Write(run.id, self.queue.checkpoint(execution, unsaved), self.queue.cancel_requested(execution.id))
        self._writes.setdefault(execution.id, []).append(write)

    async def _confirm(self, execution: Execution, *, cancellable: bool = True) -> None:
        """Wait for this execution's checkpoints issued so far; stop it if an operator cancelled it meanwhile.

        Nodes that start together each wait for the same writes (a reply can be awaited by many);
        a write leaves the list only once it is confirmed, so a failed one fails every later wait too.
        """
        pending = self._writes.get(execution.id)
        if not pending:
            return
        confirmed = list(pending)
        for write in confirmed:
            try:
                await write.stored
            except Exception as exc:
                if redis_unreachable(exc):
                    raise
                message = f"cannot checkpoint node {write.node}: {type(exc).__name__}: {exc}"
                error = QueueError(message, code="checkpoint-failed", retryable=False)
                raise error.at(node=write.node) from exc
            if await write.cancel_flagged and cancellable:
                raise ExecutionCancelled(execution.id)
        seen = {id(write) for write in confirmed}  # by identity: another waiter may have removed them already
        pending[:] = [write for write in pending if id(write) not in seen]

    def _send_events(self, execution: Execution, final: bool = False) -> None:
        """Queue pending events on the queue's auto-pipeline, beside the write that follows."""
        if self.events is None or not self.events.enabled:
            return
        runs = self._events.pop(execution.id, [])
        if final and execution.finished:
            flow = self.catalog.get(execution.flow)
            entries = [execution_event(execution, flow.trigger.type if flow else "", runs)]
        else:
            entries = [node_runs_event(execution, runs)] if runs else []
        self.events.emit_many(entries, pipeliner=self.queue.pipeliner)


_WORKER_CODES = frozenset({"flow-missing", "poison"})


@dataclass(frozen=True, slots=True)
class _Write:
    """A checkpoint on its way: the node it stores, and the replies of its HSET and the cancel-flag read."""

    node: str
    stored: asyncio.Future[Any]
    cancel_flagged: asyncio.Future[Any]


def _forget(writes: Iterable[_Write]) -> None:
    """Replies nobody will read: their errors are not worth an "exception was never retrieved" warning."""
    for write in writes:
        for future in (write.stored, write.cancel_flagged):
            if future.done():
                if not future.cancelled():
                    future.exception()
            else:
                future.add_done_callback(_retrieved)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class ExecutionCancelled(Exception):
    """Raised at a checkpoint of an execution an operator cancelled while it ran."""


@dataclass
class _Job:
    """What a worker knows about the execution it is running, for reporting an unexpected error."""

    delivery: Delivery
    flow: Flow | None = None
    execution: Execution | None = None


def _may_defer(run: NodeRun, node: FlowNode) -> bool:
    """A pure or idempotent node that passed needs no checkpoint of its own: its state rides with the next write."""
    return (node.node.pure or node.node.idempotent) and run.status in ("ok", "skipped")


def redis_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` means Redis cannot be reached or cannot take writes right now (so: retry later)."""
    while exc is not None:
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError):
            return True
        if isinstance(exc, _TRANSIENT_ERRORS):
            return True
        if isinstance(exc, ResponseError) and str(exc).split(" ", 1)[0] in _TRANSIENT_REPLIES:
            return True
        if not isinstance(exc, QueueError):
            return False
        exc = exc.__cause__  # type: ignore[assignment]
    return False


_TRANSIENT_REPLIES = frozenset({"LOADING", "READONLY", "OOM", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"})
_TRANSIENT_ERRORS = (BusyLoadingError, ReadOnlyError, OutOfMemoryError, MasterDownError, TryAgainError, ClusterDownError)
"""The same replies as redis-py raises them: it strips the prefix from the message of these."""


def _poison(flow: Flow, execution: Execution, deliveries: int) -> Outcome:
    """An execution that keeps killing its worker: dead-lettered naming the node it was running."""
    node = _running_node(flow, execution)
    last = _last_error(execution)
    seen = f"; last error: [{last.get('code')}] {last.get('message')}" if last else "; no error was recorded"
    where = f" while running node {node}" if node else ""
    return dead(execution, "poison", f"delivered {deliveries} times without finishing{where}{seen}", node, time.time())


def _error_node(exc: Exception) -> str:
    return (exc.location.node or "") if isinstance(exc, FlowChatError) else ""


def _running_node(flow: Flow | None, execution: Execution) -> str:
    """The first unfinished node whose needs all passed: the one a worker was running."""
    if flow is None:
        return ""
    for node in flow.nodes.values():
        run = execution.nodes.get(node.id)
        if run is None or run.finished:
            continue
        if all(execution.nodes[need].status in ("ok", "skipped") for need in node.needs if need in execution.nodes):
            return node.id
    return ""


def _last_error(execution: Execution) -> dict[str, object]:
    errors = [run for run in execution.nodes.values() if run.error]
    if not errors:
        return {}
    latest = max(errors, key=lambda run: run.finished_at or run.started_at or 0.0)
    return latest.error or {}


def _log_outcome(execution: Execution) -> None:
    """One line per execution event: ``<execution> * ← flow succeeded in 3.1ms``."""
    spent = sum(run.duration_ms for run in execution.nodes.values())
    if execution.status == "failed" and execution.error:
        error = execution.error
        _execution_log.warning(
            "%s %s ! %s failed: [%s] %s",
            execution.id,
            error.get("node"),
            execution.flow,
            error.get("code"),
            error.get("message"),
        )
    else:
        arrow = _ARROWS.get(execution.status, "·")
        _execution_log.info("%s * %s %s %s in %.1fms", execution.id, arrow, execution.flow, execution.status, spent)


def _order(flow: Flow | None, stored: dict[str, dict[str, object]]) -> list[tuple[str, str]]:
    if flow is not None:
        return [(node.id, node.type) for node in flow.nodes.values()]
    return [(node_id, str(run.get("type", "?"))) for node_id, run in stored.items()]
