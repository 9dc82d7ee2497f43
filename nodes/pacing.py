"""``rate_limit`` and ``metric``: pace executions exactly, and record numbers for analytics."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from flowchat import Duration, Node, NodeConfig, NodeContext, NodeError, RetryableError, Suspend, register


@register
class RateLimit(Node):
    """Allow `limit` runs per `per` for a key, exactly across workers; over it: delay, skip or fail."""

    type = "rate_limit"
    services: ClassVar[tuple[str, ...]] = ("limiter",)

    class Config(NodeConfig):
        key: str = Field(min_length=1, description="What is limited, e.g. send:{{ trigger.phone }}.")
        limit: int = Field(ge=1, description="Runs allowed per period.")
        per: Duration = Field(description="The period, e.g. 1s, 1m, 24h.")
        burst: int | None = Field(None, ge=1, description="Runs allowed at once (default: limit).")
        on_limit: Literal["delay", "skip", "fail"] = Field(
            "delay", description="delay (park until allowed), skip (allowed: false) or fail (rate-limited)."
        )

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        if config.per <= 0:
            raise NodeError("per must be longer than 0", code="node-config-invalid")
        try:
            limiter = ctx.services.get("limiter")
        except KeyError:
            raise NodeError("no limiter service in this runtime (it needs Redis)", code="service-missing") from None
        holder = f"{ctx.execution_id}:{ctx.node_id}" if config.on_limit == "delay" else None
        try:
            decision = await limiter.acquire(config.key, config.limit, config.per, config.burst, holder=holder)
        except (OSError, TimeoutError) as exc:
            raise RetryableError(f"limiter unavailable: {exc}", code="limiter-unavailable") from exc
        if decision.allowed or config.on_limit == "skip":
            return {
                "allowed": decision.allowed,
                "retry_after_ms": decision.retry_after_ms,
                "remaining": decision.remaining,
            }
        if config.on_limit == "delay":
            # the next slot is reserved for this execution; it runs again then, holding no worker
            raise Suspend(ctx.now() + decision.retry_after_ms / 1000)
        raise RetryableError(
            f"rate limit {config.limit} per {config.per:g}s reached for {config.key!r}; "
            f"retry in {decision.retry_after_ms}ms",
            code="rate-limited",
            retry_after=decision.retry_after_ms / 1000,
        )


@register
class Metric(Node):
    """Record a named number with string tags as a metric event for analytics."""

    type = "metric"
    # no I/O: its one effect is an event, queued in memory and written with the next write, naming the
    # execution and node; the metrics view keeps one of the same metric per (execution, node), so
    # running again after a crash counts once (no checkpoint, no timeout timer, no task of its own)
    pure = True

    class Config(NodeConfig):
        name: str = Field(min_length=1, max_length=200, description="Metric name, e.g. leads.qualified.")
        value: float = Field(description="The number.")
        tags: dict[str, str] = Field(default_factory=dict, description="Dimensions, name → string value.")

        @field_validator("tags", mode="before")
        @classmethod
        def _strings(cls, tags: Any) -> Any:
            # a rendered template may be a bool or a number ({{ known.found }}): keep it as text
            if isinstance(tags, dict):
                return {k: _text(v) for k, v in tags.items()}
            return tags

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        if not math.isfinite(config.value):
            raise NodeError(f"metric {config.name} value must be a finite number", code="metric-invalid")
        value: int | float = int(config.value) if config.value.is_integer() else config.value
        events = ctx.services.extra.get("events")
        if events is not None:
            events.emit("metric", ctx, {"name": config.name, "value": value, "tags": config.tags})
        return {"name": config.name, "value": value}


def _text(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value
