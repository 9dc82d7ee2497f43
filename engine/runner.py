"""Run one flow over one execution, node by node, honouring the DAG.

The same runner serves ``flowchat run`` (in process) and the durable workers.
The seams between them:

- ``checkpoint(execution, node_run, node)`` is awaited after every node settles
  (``node`` is the flow's :class:`FlowNode`); the worker persists state there, so a
  resumed execution skips finished nodes. ``confirm(execution)`` is awaited before a
  node with side effects that must not repeat (neither pure nor idempotent) starts:
  the worker waits there for the writes it has issued but not yet seen answered.
- The outcome: :meth:`Runner.advance` returns an :class:`~flowchat.outcome.Outcome`
  (decided once, in :func:`flowchat.outcome.decide`) that the worker and the queue
  act on; :meth:`Runner.run` returns the settled execution itself.
- ``defer_waits``: when a node must wait (retry backoff, a ``delay``), the
  in-process runner sleeps; a durable worker instead returns the execution as
  ``waiting`` with ``wake_at`` so the queue can park it without holding a worker.
- Leases need nothing from nodes: the worker renews the lease of every execution it
  runs, however long a node takes.

Per node the steps are: decide (``when``) → render → validate config → execute
(with timeout) → convert the output (:func:`flowchat.codec.node_output`) → classify
the outcome → checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from flowchat.codec import identity, node_output
from flowchat.errors import FlowChatError, NodeConfigError, NodeTimeout, as_flowchat_error
from flowchat.execution import Execution, NodeRun
from flowchat.flow import Flow, FlowNode
from flowchat.logs import logger_for
from flowchat.node import NodeContext, Suspend
from flowchat.outcome import Outcome, decide
from flowchat.secrets import Secrets
from flowchat.services import Services
from flowchat.templates import Template

Checkpoint = Callable[[Execution, NodeRun, FlowNode], Awaitable[None]]
Confirm = Callable[[Execution], Awaitable[None]]
Mask = Callable[[Any], Any]
DEFAULT_MAX_OUTPUT = 1024 * 1024
CLOCK_SKEW_TOLERANCE = 1.0
"""Seconds a woken execution may be early by (clocks of different boxes disagree a little)."""

log = logging.getLogger("flowchat.runner")
_node_log = logging.getLogger("flowchat.execution")


async def _no_checkpoint(execution: Execution, run: NodeRun, node: FlowNode) -> None:
    return None


async def _nothing_to_confirm(execution: Execution) -> None:
    return None


class Runner:
    """Runs executions of loaded flows.

    ``mask`` and ``max_output`` are the node-output boundary's masking step and size
    limit (:func:`flowchat.codec.node_output`).
    """

    def __init__(
        self,
        services: Services | None = None,
        *,
        checkpoint: Checkpoint = _no_checkpoint,
        confirm: Confirm = _nothing_to_confirm,
        defer_waits: bool = False,
        mask: Mask = identity,
        max_output: int = DEFAULT_MAX_OUTPUT,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.services = services or Services()
        self.checkpoint = checkpoint
        self.confirm = confirm
        self.defer_waits = defer_waits
        # secret values never reach storage, downstream templates or the trace (secrets.Secrets.mask)
        self.mask = mask if mask is not identity or not self.services.secrets else self.services.secrets.mask
        self.max_output = max_output
        # an explicit sleep wins; else the services' (flowchat.testing's fake clock jumps instead)
        self.sleep = sleep if sleep is not asyncio.sleep else self.services.sleep
        """How the in-process runner waits out a retry backoff or a ``delay`` (``--fast-forward`` skips)."""

    async def run(self, flow: Flow, execution: Execution) -> Execution:
        """Advance ``execution`` as far as it can go; return it settled or waiting."""
        return (await self.advance(flow, execution)).execution

    async def advance(self, flow: Flow, execution: Execution) -> Outcome:
        """Advance ``execution`` as far as it can go and decide its outcome."""
        execution.status = "running"
        execution.started_at = execution.started_at or self.services.clock()
        graph = _Frontier(flow, execution)
        context = template_context(flow, execution, self.services.secrets)  # grows as nodes pass
        running: dict[asyncio.Task[None], FlowNode] = {}
        try:
            while True:
                ready, skipped = ([], []) if graph.failed else self._take_ready(execution, graph)
                for node in skipped:
                    await self.checkpoint(execution, execution.nodes[node.id], node)
                waits = []
                for node in ready:
                    if node.node.pure:  # no I/O to overlap with: it runs now, in this task
                        await self._run_node(flow, execution, node, context)
                        _settled(graph, node, execution, context)
                    else:
                        waits.append(node)
                if len(waits) == 1 and not running and not graph.unblocked:
                    await self._run_node(flow, execution, waits[0], context)  # a linear step needs no task
                    _settled(graph, waits[0], execution, context)
                    continue
                for node in waits:
                    running[asyncio.create_task(self._run_node(flow, execution, node, context))] = node
                if graph.unblocked and not graph.failed:
                    continue  # what the pure nodes unblocked starts now, not after a sibling finishes
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    node = running.pop(task)
                    task.result()
                    _settled(graph, node, execution, context)
        except BaseException:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
        return decide(execution, self.services.clock())

    def _take_ready(self, execution: Execution, graph: _Frontier) -> tuple[list[FlowNode], list[FlowNode]]:
        """Nodes that can start now, and the nodes skipped on the way (all their needs were skipped)."""
        ready: list[FlowNode] = []
        skipped: list[FlowNode] = []
        while graph.unblocked:
            node = graph.unblocked.popleft()
            run = execution.nodes[node.id]
            if node.needs and all(execution.nodes[need].status == "skipped" for need in node.needs):
                self._close(run, "skipped", None)
                skipped.append(node)
                graph.settled(node)
            elif not (run.status == "waiting" and self.defer_waits and (run.wake_at or 0) > self._now_with_skew()):
                ready.append(node)
        return ready, skipped

    def _now_with_skew(self) -> float:
        # the mover's clock decided this is due; trust it within a second of ours, not ping-pong
        return self.services.clock() + CLOCK_SKEW_TOLERANCE

    # --- one node -----------------------------------------------------------------

    async def _run_node(self, flow: Flow, execution: Execution, node: FlowNode, context: dict[str, Any]) -> None:
        run = execution.nodes[node.id]
        try:
            started = time.perf_counter()
            go = _truthy(node.when, context)
            _within_timeout(node, time.perf_counter() - started, "evaluating its `when`")
            if not go:
                self._close(run, "skipped", None)
                await self.checkpoint(execution, run, node)
                return
        except FlowChatError as error:
            await self._fail(flow, execution, node, run, error)
            return
        if not (node.node.pure or node.node.idempotent):
            await self.confirm(execution)  # what ran before is stored before this node's effect happens
        while True:
            outcome = await self._attempt(flow, execution, node, run, context)
            if outcome is None:
                return
            if not self.defer_waits:
                await self.sleep(max(0.0, outcome - self.services.clock()))

    async def _attempt(
        self, flow: Flow, execution: Execution, node: FlowNode, run: NodeRun, context: dict[str, Any]
    ) -> float | None:
        """One attempt. Returns when to try again if in-process waiting is due, else None."""
        run.attempts += 1
        run.started_at = run.started_at or self.services.clock()
        started = time.perf_counter()
        ctx = self._context(flow, execution, node, run)
        if _node_log.isEnabledFor(logging.DEBUG):
            ctx.log.debug("→ %s attempt %d", node.type, run.attempts)
        try:
            output = await self._execute(node, ctx, context, started)
        except Suspend as suspend:
            run.attempts -= 1  # waiting is not a failed attempt
            run.duration_ms += (time.perf_counter() - started) * 1000
            return await self._wait(execution, node, run, suspend.until, None)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            run.duration_ms += (time.perf_counter() - started) * 1000
            error = as_flowchat_error(exc).at(
                flow=flow.name, execution=execution.id, node=node.id, attempt=run.attempts
            )
            if error.retryable and run.attempts < node.retry.max_attempts:
                delay = node.retry.delay(run.attempts, getattr(error, "retry_after", None))
                ctx.log.warning("↻ %s in %.2fs: [%s] %s", node.type, delay, error.code, error.message)
                return await self._wait(execution, node, run, self.services.clock() + delay, error)
            await self._fail(flow, execution, node, run, error)
            return None
        run.duration_ms += (time.perf_counter() - started) * 1000
        if _node_log.isEnabledFor(logging.DEBUG):
            ctx.log.debug("← %s ok in %.1fms", node.type, run.duration_ms)
        self._close(run, "ok", output)
        await self.checkpoint(execution, run, node)
        return None

    async def _execute(
        self, node: FlowNode, ctx: NodeContext, context: dict[str, Any], started: float
    ) -> dict[str, Any]:
        """Render the config and run the node; both count against the node's timeout."""
        config = node.static_config
        try:
            if config is None:
                config = node.node.Config.model_validate(node.render(context))
                # rendering is synchronous (no timer can interrupt it): what it took is taken from the budget
                _within_timeout(node, time.perf_counter() - started, "rendering its config")
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'with'}: {e['msg']}" for e in exc.errors())
            raise NodeConfigError(f"rendered config is invalid: {fields}") from exc
        if node.node.pure:
            output = await node.node.run(ctx, config)
        else:
            timer = _Timer(node.timeout - (time.perf_counter() - started), node.timeout)
            try:
                output = await node.node.run(ctx, config)
            except asyncio.CancelledError as exc:
                timer.raise_if_expired(exc)
                raise
            finally:
                timer.cancel()
        return node_output(output, mask=self.mask, max_bytes=self.max_output)

    def _context(self, flow: Flow, execution: Execution, node: FlowNode, run: NodeRun) -> NodeContext:
        return NodeContext(
            flow=flow.name,
            execution_id=execution.id,
            node_id=node.id,
            attempt=run.attempts,
            trigger=execution.trigger,
            vars=flow.vars,
            services=self.services,
            first_started_at=run.started_at or self.services.clock(),
            flow_dir=flow.directory,
            first_run=run.attempts == 1 and execution.deliveries == 1,
        )

    async def _wait(
        self, execution: Execution, node: FlowNode, run: NodeRun, until: float, error: FlowChatError | None
    ) -> float | None:
        run.status, run.wake_at = "waiting", until
        run.error = self.mask(error.to_dict()) if error else None
        await self.checkpoint(execution, run, node)
        return None if self.defer_waits else until

    async def _fail(self, flow: Flow, execution: Execution, node: FlowNode, run: NodeRun, error: FlowChatError) -> None:
        error.at(flow=flow.name, execution=execution.id, node=run.id, attempt=run.attempts or None)
        logger_for(execution.id, run.id).error("! %s failed: [%s] %s", run.type, error.code, error.message)
        run.error = self.mask(error.to_dict())
        self._close(run, "failed", None)
        await self.checkpoint(execution, run, node)

    def _close(self, run: NodeRun, status: Any, output: Any) -> None:
        """``run`` settles as ``status`` (its checkpoint comes next)."""
        run.status, run.output, run.wake_at = status, output, None
        if status != "failed":
            run.error = None
        run.finished_at = self.services.clock()


class _Frontier:
    """Which nodes are unblocked, kept by counting each node's unsettled needs (Kahn's algorithm)."""

    def __init__(self, flow: Flow, execution: Execution) -> None:
        self.flow = flow
        self.runs = execution.nodes
        self.failed = any(run.status == "failed" for run in self.runs.values())
        self.blocked_by: dict[str, int] = {}
        self.unblocked: deque[FlowNode] = deque()
        for node in flow.nodes.values():
            if not self.runs[node.id].finished:
                self.blocked_by[node.id] = sum(1 for need in node.needs if self.runs[need].status not in _PASSED)
                if self.blocked_by[node.id] == 0:
                    self.unblocked.append(node)

    def settled(self, node: FlowNode) -> None:
        """``node`` stopped running: unblock what it was holding up, if it passed."""
        status = self.runs[node.id].status
        if status == "failed":
            self.failed = True
        if status not in _PASSED:
            return
        for dependent in self.flow.dependents.get(node.id, ()):
            if dependent in self.blocked_by:
                self.blocked_by[dependent] -= 1
                if self.blocked_by[dependent] == 0:
                    self.unblocked.append(self.flow.nodes[dependent])


_PASSED = frozenset({"ok", "skipped"})


def _settled(graph: _Frontier, node: FlowNode, execution: Execution, context: dict[str, Any]) -> None:
    """``node`` stopped running: its output joins what templates see, and the nodes it held up may start."""
    run = execution.nodes[node.id]
    if run.status == "ok":
        context[node.id] = run.output
    graph.settled(node)
_NO_SECRETS = Secrets()


def _within_timeout(node: FlowNode, spent: float, doing: str) -> None:
    if spent > node.timeout:
        raise NodeTimeout(f"{doing} took {spent:.1f}s, over the node's timeout of {node.timeout:g}s")


class _Timer:
    """Cancels the current task after ``seconds`` (a leaner asyncio.timeout, with no coroutine of its own).

    ``budget`` is the node's whole timeout, named in the error (``seconds`` may be what is left of it).
    """

    __slots__ = ("budget", "expired", "handle", "task")

    def __init__(self, seconds: float, budget: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task, self.budget, self.expired = task, budget, False
        self.handle = asyncio.get_running_loop().call_later(max(0.0, seconds), self._expire)

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()

    def raise_if_expired(self, cancelled: asyncio.CancelledError) -> None:
        """Turn the cancellation this timer caused into NodeTimeout (any other cancellation stays one)."""
        if self.expired and self.task.uncancel() == 0:
            raise NodeTimeout(f"node took longer than its timeout of {self.budget:g}s") from cancelled

    def cancel(self) -> None:
        self.handle.cancel()


def template_context(flow: Flow, execution: Execution, secrets: Secrets | None = None) -> dict[str, Any]:
    """What templates see: trigger, vars, flow, execution, secrets, finished nodes' outputs."""
    context: dict[str, Any] = {node_id: run.output for node_id, run in execution.nodes.items() if run.status == "ok"}
    context.update(
        trigger=execution.trigger,
        vars=flow.vars,
        flow={"name": flow.name, "description": flow.spec.description, "version": flow.version},
        execution={"id": execution.id, "created_at": execution.created_at},
        secrets=(secrets or _NO_SECRETS).view,
    )
    return context


def _truthy(when: Template | bool | None, context: dict[str, Any]) -> bool:
    if when is None:
        return True
    if isinstance(when, Template):
        return bool(when.render(context))
    return bool(when)
