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
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from flowchat.backoff import Backoff, retrying
from flowchat.catalog import Catalog
from flowchat.errors import FlowChatError
from flowchat.execution import Execution, NodeRun
from flowchat.flow import Flow
from flowchat.metrics import Metrics
from flowchat.mover import DelayedMover  # re-exported: it lived here before flowchat.mover
from flowchat.queue import Delivery, Loaded, Queue, execution_from_parts
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
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> WorkerSettings:
        """Worker settings from the process's :class:`Settings`, with some fields overridden."""
        values: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout, "grace": settings.grace}
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
        self.runner = Runner(services, checkpoint=self._checkpoint, defer_waits=True)
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self._unsaved: dict[str, list[NodeRun]] = {}
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
                log.warning("cannot renew leases: %s", exc)
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
                log.warning("cannot reclaim stalled work: %s", exc)
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

    async def _execute(self, loaded: Loaded) -> None:
        delivery = loaded.delivery
        try:
            await self._execute_loaded(loaded)
        except (RedisError, OSError, FlowChatError) as exc:
            log.warning("%s left for take-over: %s", delivery.execution_id, exc)
        except Exception:
            log.exception("%s crashed the worker task; left for take-over", delivery.execution_id)
        finally:  # also when cancelled (lease lost, or shutdown past the grace period)
            self._unsaved.pop(delivery.execution_id, None)

    async def _execute_loaded(self, loaded: Loaded) -> None:
        delivery, meta = loaded.delivery, loaded.meta
        if meta is None:
            log.error("%s has no stored state; dropping its queue entry", delivery.execution_id)
            await self.queue.drop_delivery(delivery)
            return
        flow = await self.catalog.version(meta["flow"], meta["flow_version"], self.queue.flow_source)
        execution = execution_from_parts(meta, loaded.nodes, _order(flow, loaded.nodes))
        if flow is None:
            await self._dead(
                delivery,
                execution,
                "flow-missing",
                f"flow {meta['flow']} version {meta['flow_version']} is not available",
            )
            return
        if loaded.deliveries > self.queue.max_deliveries:
            await self._dead(
                delivery,
                execution,
                "poison",
                f"delivered {loaded.deliveries} times without finishing",
                _last_error(execution),
            )
            return
        if execution.started_at is None:
            self.metrics.execution_event(flow.name, "started")
        execution = await self.runner.run(flow, execution)
        await self._settle(delivery, flow, execution)

    async def _settle(self, delivery: Delivery, flow: Flow, execution: Execution) -> None:
        if _execution_log.isEnabledFor(logging.INFO):
            _log_outcome(flow, execution)
        if execution.status == "failed":
            error = execution.error or {}
            self.metrics.execution_event(flow.name, "failed")
            dead = {
                "node": str(error.get("node", "")),
                "code": str(error.get("code", "")),
                "message": str(error.get("message", "")),
            }
            await self._finish(delivery, execution, dead=dead)
            return
        if execution.status == "waiting" and any(
            run.error for run in execution.nodes.values() if run.status == "waiting"
        ):
            self.metrics.execution_event(flow.name, "retried")
            await self.queue.count("retried", flow.name)
        elif execution.status == "succeeded":
            self.metrics.execution_event(flow.name, "succeeded")
        await self._finish(delivery, execution)

    async def _dead(self, delivery: Delivery, execution: Execution, code: str, message: str, node: str = "") -> None:
        log.error("%s dead-lettered: [%s] %s", execution.id, code, message)
        execution.status = "failed"
        execution.error = {"code": code, "message": message, "node": node, "retryable": False}
        await self._finish(delivery, execution, dead={"node": node, "code": code, "message": message})

    async def _finish(self, delivery: Delivery, execution: Execution, dead: dict[str, str] | None = None) -> None:
        runs = self._unsaved.pop(execution.id, ())
        if not await self.queue.finish(delivery, execution, self.settings.consumer, dead=dead, runs=runs):
            log.error("%s: lease lost before finishing; the worker that took it over owns the outcome", execution.id)

    async def _checkpoint(self, execution: Execution, run: NodeRun) -> None:
        """Persist a settled node before anything downstream of it can run.

        Two kinds of state ride along with a later write instead of costing a round trip:
        the last node's (written atomically with the outcome) and that of instant nodes,
        which have no side effects, so redoing one after a crash is harmless.
        """
        if run.finished or run.status == "waiting":
            self.metrics.node_ran(run.type, run.status, run.duration_ms / 1000)
        unsaved = self._unsaved.setdefault(execution.id, [])
        unsaved.append(run)
        if self._can_wait(run) or all(other.finished for other in execution.nodes.values()):
            return
        del self._unsaved[execution.id]
        await self.queue.checkpoint(execution, unsaved)

    def _can_wait(self, run: NodeRun) -> bool:
        node = self.catalog.registry.get(run.type)
        return run.status in ("ok", "skipped") and node is not None and node.instant


def _log_outcome(flow: Flow, execution: Execution) -> None:
    """One line per execution event: ``<execution> * ← flow succeeded in 3.1ms``."""
    spent = sum(run.duration_ms for run in execution.nodes.values())
    if execution.status == "failed" and execution.error:
        error = execution.error
        _execution_log.warning(
            "%s %s ! %s failed: [%s] %s",
            execution.id,
            error.get("node"),
            flow.name,
            error.get("code"),
            error.get("message"),
        )
    else:
        arrow = _ARROWS.get(execution.status, "·")
        _execution_log.info("%s * %s %s %s in %.1fms", execution.id, arrow, flow.name, execution.status, spent)


def _order(flow: Flow | None, stored: dict[str, dict[str, object]]) -> list[tuple[str, str]]:
    if flow is not None:
        return [(node.id, node.type) for node in flow.nodes.values()]
    return [(node_id, str(run.get("type", "?"))) for node_id, run in stored.items()]


def _last_error(execution: Execution) -> str:
    for run in execution.nodes.values():
        if run.error:
            return run.id
    return ""
