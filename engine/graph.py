"""A flow's graph: the ``needs`` between its nodes, checked and walked, and drawn as Mermaid.

``needs`` maps each node id to the ids it waits for (resolved with the default: a node
without ``needs`` follows the node above it). The loader checks it for cycles and unknown
names; the runner walks it (Kahn's algorithm, in :mod:`flowchat.runner`); ``flowchat graph``
draws it.
"""

from __future__ import annotations

import graphlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowchat.flow import Flow

Needs = dict[str, tuple[str, ...]]


def resolve_needs(specs: list[tuple[str, list[str] | None]]) -> Needs:
    """Apply the default: a node without ``needs`` follows the node above it."""
    needs: Needs = {}
    previous: str | None = None
    for node_id, declared in specs:
        if declared is not None:
            needs[node_id] = tuple(declared)
        else:
            needs[node_id] = (previous,) if previous is not None else ()
        previous = node_id
    return needs


def find_cycle(needs: Needs) -> list[str] | None:
    """One cycle in the graph, as the node ids around it (first repeated last), or None.

    Needs naming nodes that do not exist are ignored here (the loader reports them apart).
    """
    known = {node_id: tuple(need for need in node_needs if need in needs) for node_id, node_needs in needs.items()}
    try:
        graphlib.TopologicalSorter(known).prepare()
    except graphlib.CycleError as error:
        cycle: list[str] = list(error.args[1])
        return cycle[::-1]  # graphlib lists it from dependent to need; read it as "a needs b needs … a"
    return None


def ancestors(needs: Needs, node_id: str) -> set[str]:
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


def dependents_of(needs: Needs) -> Needs:
    """The reverse of ``needs``: for each node, the nodes that wait for it."""
    result: dict[str, list[str]] = {node_id: [] for node_id in needs}
    for node_id, node_needs in needs.items():
        for need in node_needs:
            result.setdefault(need, []).append(node_id)
    return {node_id: tuple(children) for node_id, children in result.items()}


# --- drawing ---------------------------------------------------------------------------


def mermaid(flow: Flow) -> str:
    """``flowchart TD`` text: the trigger, each node with its type, ``needs`` as edges.

    Node boxes are named ``n_<id>`` so no node id can be read as a Mermaid keyword (``end``,
    ``graph``, ``subgraph`` …) or merge with the trigger box; the label shows the real id.
    An edge into a node with a ``when`` is dotted and labelled with the condition.
    """
    lines = ["flowchart TD", f'  trigger(["{_text(flow.trigger.type)}"])']
    for node in flow.nodes.values():
        label = f"{_text(node.id)}<br/><small>{_text(node.type)}</small>"
        shape = '{{"' + label + '"}}' if node.when is not None else f'["{label}"]'
        lines.append(f"  {_box(node.id)}{shape}")
    for node in flow.nodes.values():
        sources = [_box(need) for need in node.needs] or ["trigger"]
        arrow = f'-.->|"{_text(_condition(node.when))}"|' if node.when is not None else "-->"
        lines.extend(f"  {source} {arrow} {_box(node.id)}" for source in sources)
    return "\n".join(lines) + "\n"


def _box(node_id: str) -> str:
    return f"n_{node_id}"


def _condition(when: object) -> str:
    source = getattr(when, "source", when)
    text = str(source).strip()
    if text.startswith("{{") and text.endswith("}}") and text.count("{{") == 1:
        text = text[2:-2].strip()
    return text


def _text(value: str) -> str:
    """Text safe inside a quoted Mermaid label (entity codes for what would end or break it)."""
    return (
        value.replace("&", "#amp;")
        .replace('"', "#quot;")
        .replace("<", "#lt;")
        .replace(">", "#gt;")
        .replace("|", "#124;")
    )
