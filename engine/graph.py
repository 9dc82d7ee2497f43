"""Draw a flow as a Mermaid flowchart."""

from __future__ import annotations

from flowchat.flow import Flow


def mermaid(flow: Flow) -> str:
    """``flowchart TD`` text: the trigger, each node with its type, and ``needs`` as edges."""
    lines = ["flowchart TD", f'  trigger(["{flow.trigger.type}"])']
    for node in flow.nodes.values():
        label = f"{node.id}<br/><small>{node.type}</small>"
        shape = '{{"' + label + '"}}' if node.when is not None else f'["{label}"]'
        lines.append(f"  {node.id}{shape}")
    for node in flow.nodes.values():
        sources = node.needs or ("trigger",)
        arrow = "-. when .->" if node.when is not None else "-->"
        lines.extend(f"  {source} {arrow} {node.id}" for source in sources)
    return "\n".join(lines) + "\n"
