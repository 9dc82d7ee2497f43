"""A loaded flow: validated, with its templates compiled and its graph resolved."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from flowchat.node import Node, RetryPolicy
from flowchat.secrets import referenced_secrets
from flowchat.spec import FlowSpec
from flowchat.templates import Template, iter_templates


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


def resolve_needs(specs: list[tuple[str, list[str] | None]]) -> dict[str, tuple[str, ...]]:
    """Apply the default: a node without ``needs`` follows the node above it."""
    needs: dict[str, tuple[str, ...]] = {}
    previous: str | None = None
    for node_id, declared in specs:
        if declared is not None:
            needs[node_id] = tuple(declared)
        else:
            needs[node_id] = (previous,) if previous is not None else ()
        previous = node_id
    return needs


def find_cycle(needs: dict[str, tuple[str, ...]]) -> list[str] | None:
    """One cycle in the graph, as the node ids around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node_id: str) -> list[str] | None:
        state[node_id] = 1
        stack.append(node_id)
        for need in needs.get(node_id, ()):
            if need not in needs:
                continue
            if state.get(need) == 1:
                return [*stack[stack.index(need) :], need]
            if need not in state and (cycle := visit(need)):
                return cycle
        stack.pop()
        state[node_id] = 2
        return None

    for node_id in needs:
        if node_id not in state and (cycle := visit(node_id)):
            return cycle
    return None


def ancestors(needs: dict[str, tuple[str, ...]], node_id: str) -> set[str]:
    """Every node ``node_id`` waits for, directly or not."""
    seen: set[str] = set()
    stack = list(needs.get(node_id, ()))
    while stack:
        current = stack.pop()
        if current in seen or current not in needs:
            continue
        seen.add(current)
        stack.extend(needs[current])
    return seen


def dependents_of(needs: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    result: dict[str, list[str]] = {node_id: [] for node_id in needs}
    for node_id, node_needs in needs.items():
        for need in node_needs:
            result.setdefault(need, []).append(node_id)
    return {node_id: tuple(children) for node_id, children in result.items()}
