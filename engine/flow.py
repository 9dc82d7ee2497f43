"""A loaded flow: validated, with its templates compiled and its graph resolved.

The graph algorithms live in :mod:`flowchat.graph` (re-exported here for older imports).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from flowchat.errors import FlowChatError, FlowError
from flowchat.graph import ancestors, dependents_of, find_cycle, resolve_needs
from flowchat.node import Node, RetryPolicy
from flowchat.secrets import referenced_secrets
from flowchat.spec import FlowSpec
from flowchat.templates import Renderer, Template, iter_templates, tree_renderer


@dataclass(frozen=True, slots=True)
class FlowNode:
    """One node of a loaded flow."""

    id: str
    type: str
    node: Node
    config: Any
    """The ``with`` tree with its template strings compiled."""
    needs: tuple[str, ...]
    when: Template | bool | None
    retry: RetryPolicy
    timeout: float
    static_config: Any = None
    """The validated Config when ``with`` has no templates: built once, at load time."""
    render: Renderer = field(init=False, repr=False, compare=False)
    """Renders ``config`` for one run (:func:`~flowchat.templates.tree_renderer`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "render", tree_renderer(self.config))


@dataclass(frozen=True)
class Flow:
    """A flow ready to run. ``version`` changes whenever its file does."""

    spec: FlowSpec
    nodes: dict[str, FlowNode]
    file: str
    version: str
    dependents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        return self.spec.flow

    @cached_property
    def directory(self) -> Path:
        """The folder of the flow file: relative paths in node configs start here."""
        return Path(self.file).resolve().parent

    @cached_property
    def trigger_validator(self) -> Draft202012Validator | None:
        """The trigger's ``schema`` compiled once for this version (webhooks only)."""
        schema = getattr(self.spec.trigger, "schema_", None)
        return Draft202012Validator(schema) if schema is not None else None

    @cached_property
    def secrets(self) -> set[str]:
        """Names of the secrets this flow's templates read (``secrets.NAME``)."""
        templates = [template for node in self.nodes.values() for _, template in iter_templates(node.config)]
        templates.extend(node.when for node in self.nodes.values() if isinstance(node.when, Template))
        return referenced_secrets(templates)

    @property
    def services(self) -> set[str]:
        """Names of the services this flow's nodes declare they need."""
        return {name for node in self.nodes.values() for name in type(node.node).services}

    @property
    def trigger(self) -> Any:
        return self.spec.trigger

    @property
    def vars(self) -> dict[str, Any]:
        return self.spec.vars

    @property
    def webhook_path(self) -> str | None:
        """The path a webhook flow listens on under /hooks/ (its ``path``, else its name), or None."""
        trigger = self.spec.trigger
        return str(trigger.path or self.name) if trigger.type == "webhook" else None

    def clash(self, others: Iterable[Flow]) -> FlowChatError | None:
        """Why this flow cannot serve beside ``others``: another file's flow with its name or webhook path."""
        route = self.webhook_path
        for other in others:
            if other.file == self.file:
                continue
            if other.name == self.name:
                message = f"flow name {self.name!r} is also used by {other.file}"
                return FlowError(message, code="flow-duplicate-name").at(file=self.file, line=1, col=1)
            if route is not None and other.webhook_path == route:
                message = f"webhook path /hooks/{route} is already served by flow {other.name!r} ({other.file})"
                return FlowError(message, code="webhook-path-taken").at(file=self.file, line=1, col=1)
        return None


__all__ = ["Flow", "FlowNode", "ancestors", "dependents_of", "find_cycle", "resolve_needs"]


def trigger_payload(flow: Flow, given: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The trigger as the daemon builds it: a schedule's payload with ``tick`` (the minute of ``now``) and
    ``missed``; a webhook payload checked against its schema (``ValueError`` naming every mismatch)."""
    if flow.trigger.type == "schedule":
        moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
        tick = moment.replace(second=0, microsecond=0).isoformat()
        return {**flow.trigger.payload, "tick": tick, "missed": 0, **given}
    validator = flow.trigger_validator
    if validator is not None:
        errors = sorted(validator.iter_errors(given), key=lambda e: e.json_path)
        if errors:
            listed = "; ".join(f"{error.json_path}: {error.message}" for error in errors)
            raise ValueError(f"the payload does not match the trigger schema ({len(errors)} error(s)): {listed}")
    return given
