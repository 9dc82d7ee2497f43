"""An example plugin: drop a module like this into plugins/ (or ship it as a pip
package with an entry point in the ``flowchat.nodes`` group)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from flowchat import Node, NodeConfig, NodeContext, register


@register
class Greeting(Node):
    """Compose a greeting for a contact in their language."""

    type = "example.greeting"

    class Config(NodeConfig):
        name: str = Field(description="Who to greet.")
        language: str = Field("en", pattern="^(en|es|pt)$", description="en, es or pt.")

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        hello = {"en": "Hello", "es": "Hola", "pt": "Olá"}[config.language]
        return {"text": f"{hello}, {config.name}!"}
