"""A test harness for node and flow authors: run one node, or one flow, the way a worker does.

::

    from flowchat.testing import run_node, run_flow

    async def test_shout():
        assert await run_node("text.shout", {"text": "hi"}) == {"text": "HI"}

    async def test_reminder_flow():
        execution = await run_flow("flows/reminder.yaml", {"name": "Ana"})
        assert execution.status == "succeeded"

Both go through the same steps as ``flowchat worker``: the node's config is
checked as the loader checks it, templates render against the trigger (and
``secrets``), the rendered config is validated, ``run`` is awaited under the
node's timeout, and the output passes the node-output boundary (JSON
conversion, secret masking, size limit) and is round-tripped through the
stored-state codec. Waits (``delay``, retry backoff) run on a :class:`FakeClock`
that jumps instead of sleeping, so a flow with ``delay: {for: 2h}`` finishes at once.
Both are coroutines: with pytest, use pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from flowchat.codec import through_codec
from flowchat.errors import FlowChatError, NodeError
from flowchat.execution import Execution
from flowchat.flow import Flow, trigger_payload
from flowchat.loader import load_flow, load_flow_text
from flowchat.node import Node
from flowchat.registry import Registry, load_registry
from flowchat.runner import Runner
from flowchat.services import Services, open_services
from flowchat.settings import Settings

__all__ = ["FakeClock", "NodeFailed", "run_flow", "run_node"]


class FakeClock:
    """Time that only moves when told: ``clock()`` reads it, ``await clock.sleep(s)`` jumps ahead.

    Starts at the real time unless ``start`` (epoch seconds) is given.
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start
        self.slept: list[float] = []
        """Every wait that was skipped, in seconds (a delay's length, each retry's backoff)."""

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)


class NodeFailed(NodeError):
    """:func:`run_node`'s node failed: ``code``, ``message`` and ``retryable`` are the node's error's."""


async def run_node(
    node_type_or_class: str | type[Node],
    config: Mapping[str, Any] | None = None,
    *,
    trigger: Mapping[str, Any] | None = None,
    services: Services | Mapping[str, Any] | None = None,
    clock: FakeClock | None = None,
    secrets: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run one node once, as a worker would, and return its output as it would be stored.

    ``config`` is the node's ``with`` (templates allowed, rendered against ``trigger``);
    ``services`` are ready objects by name (or a whole :class:`Services`); services the node
    declares and that are not given start from their installed entry points. ``secrets`` are
    the values of ``secrets.NAME``. A failure raises :class:`NodeFailed` with the node's error
    code (``node-config-invalid`` and friends for a config the loader would refuse: a
    :class:`~flowchat.FlowInvalid`). No retries: each call is one attempt.
    """
    registry, node_type = _registry_with(node_type_or_class)
    given = services if isinstance(services, Services) else None
    extra = dict(services) if isinstance(services, Mapping) else {}
    registry.services |= set(extra) | (set(given.extra) if given is not None else set())
    document = {
        "flow": "run_node",
        "trigger": {"type": "webhook"},
        "nodes": [{"id": "node", "type": node_type, "with": dict(config or {}), "retry": {"max_attempts": 1}}],
    }
    flow = load_flow_text(yaml.safe_dump(document, sort_keys=False), "<run_node>", registry)
    execution = await _run(flow, dict(trigger or {}), given, extra, clock or FakeClock(), secrets)
    run = execution.nodes["node"]
    if run.error is not None:
        error = run.error
        raise NodeFailed(
            str(error.get("message", "")), code=str(error.get("code")), retryable=bool(error.get("retryable"))
        )
    return dict(run.output or {})


async def run_flow(
    path_or_text: str | Path,
    payload: Mapping[str, Any] | None = None,
    *,
    fast_forward: bool = True,
    services: Services | Mapping[str, Any] | None = None,
    registry: Registry | None = None,
    secrets: Mapping[str, str] | None = None,
    clock: FakeClock | None = None,
    execution_id: str | None = None,
) -> Execution:
    """Load a flow (a file path, or YAML text) and run it over ``payload``; return the trace.

    Node types are the built-ins, installed plugins and the plugins folder (or ``registry``).
    With ``fast_forward`` (the default) waits are skipped on a :class:`FakeClock` (pass
    ``clock`` to read it afterwards); without it they take real time. The returned
    :class:`~flowchat.Execution` has each node's ``status``, ``attempts``, ``output`` (as
    stored) and ``error``; it settles ``succeeded`` or ``failed``.
    """
    registry = registry if registry is not None else load_registry()
    given = services if isinstance(services, Services) else None
    extra = dict(services) if isinstance(services, Mapping) else {}
    registry.services |= set(extra) | (set(given.extra) if given is not None else set())
    flow = _load(path_or_text, registry)
    if fast_forward and clock is None:
        clock = FakeClock()
    clock = clock if fast_forward else None
    return await _run(flow, dict(payload or {}), given, extra, clock, secrets, execution_id)


def _registry_with(node: str | type[Node]) -> tuple[Registry, str]:
    registry = load_registry()
    if isinstance(node, str):
        return registry, node
    if registry.types.get(node.type) not in (None, node):
        raise FlowChatError(f"node type {node.type!r} is already taken by {registry.sources[node.type]}")
    registry.types[node.type] = node
    registry.sources[node.type] = f"test class {node.__module__}.{node.__qualname__}"
    return registry, node.type


def _load(path_or_text: str | Path, registry: Registry) -> Flow:
    if isinstance(path_or_text, Path) or ("\n" not in path_or_text and Path(path_or_text).is_file()):
        return load_flow(path_or_text, registry)
    return load_flow_text(path_or_text, "<flow text>", registry)


async def _run(
    flow: Flow,
    trigger: dict[str, Any],
    given: Services | None,
    extra: dict[str, Any],
    clock: FakeClock | None,
    secrets: Mapping[str, str] | None,
    execution_id: str | None = None,
) -> Execution:
    async with _services(flow, given, extra, clock, secrets) as services:
        runner = Runner(services, checkpoint=through_codec, max_output=services.settings.max_output)
        payload = trigger_payload(flow, trigger, services.clock())  # a schedule's tick from the (fake) clock
        return await runner.run(flow, Execution.new(flow, payload, execution_id))


@contextlib.asynccontextmanager
async def _services(
    flow: Flow,
    given: Services | None,
    extra: dict[str, Any],
    clock: FakeClock | None,
    secrets: Mapping[str, str] | None,
) -> AsyncIterator[Services]:
    if given is not None:
        yield given
        return
    environ = dict(Settings.from_env().environ)
    environ.update({f"FLOWCHAT_SECRET_{name}": value for name, value in (secrets or {}).items()})
    settings = Settings.from_env(environ)
    timing: dict[str, Any] = {"clock": clock, "sleep": clock.sleep} if clock is not None else {}
    async with open_services(settings, only=flow.services, **timing, **extra) as services:
        yield services
