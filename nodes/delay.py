"""``delay``: wait for a duration or until a time, durably and without holding a worker."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import Field, model_validator

from flowchat import Duration, Node, NodeConfig, NodeContext, NodeError, Suspend, register


@register
class Delay(Node):
    """Wait `for` a duration or `until` an ISO time; the execution is parked, not slept on."""

    type = "delay"
    timeout = 5.0

    class Config(NodeConfig):
        for_: Duration | None = Field(None, alias="for", description="How long to wait, e.g. 10m.")
        until: str | None = Field(None, description="ISO 8601 time to wait until (a template); naive means UTC.")

        @model_validator(mode="after")
        def _one(self) -> Delay.Config:
            if (self.for_ is None) == (self.until is None):
                raise ValueError("give exactly one of for or until")
            return self

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        wake = ctx.first_started_at + config.for_ if config.for_ is not None else _parse_time(str(config.until))
        now = ctx.now()
        if now < wake:
            raise Suspend(wake)
        return {"waited_until": datetime.fromtimestamp(wake, UTC).isoformat()}


def _parse_time(value: str) -> float:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise NodeError(f"until is not an ISO 8601 time: {value!r}", code="delay-bad-time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
