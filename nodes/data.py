"""Data nodes: compute values (``set``) and write log lines (``log``)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field

from flowchat import Node, NodeConfig, NodeContext, mask_phones, register


@register
class Set(Node):
    """Compute named values from templates; the output is those values."""

    type = "set"
    pure = True

    class Config(NodeConfig):
        values: dict[str, Any] = Field(description="Name → value; template strings render to native types.")

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        return dict(config.values)


@register
class Log(Node):
    """Write a log line with the execution and node ids (phone numbers masked)."""

    type = "log"
    pure = True

    class Config(NodeConfig):
        message: str = Field(description="The line to log; a template.")
        level: Literal["debug", "info", "warning", "error"] = Field(
            "info", description="debug, info, warning or error."
        )

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        ctx.log.log(logging.getLevelName(config.level.upper()), "%s", config.message)
        return {"message": mask_phones(config.message)}
