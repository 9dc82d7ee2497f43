"""``whatsapp.send``: send a WhatsApp message through the ``whatsapp`` service (Twilio or the outbox)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowchat import Node, NodeConfig, NodeContext, NodeError, RetryPolicy, register


class TemplateConfig(BaseModel):
    """An approved WhatsApp template (Twilio Content API)."""

    model_config = ConfigDict(extra="forbid")

    # checked by a validator, not a schema pattern, so editors accept a template string here
    content_sid: str = Field(description="The template's Content SID (HX followed by 32 hex digits).")
    variables: dict[str, str | int | float] = Field(
        default_factory=dict, description="Template variables by placeholder ('1', '2', …); each up to 1600 chars."
    )

    @field_validator("content_sid")
    @classmethod
    def _sid(cls, value: str) -> str:
        if not re.fullmatch(r"HX[0-9a-fA-F]{32}", value):
            raise ValueError(f"content_sid must be HX followed by 32 hex digits, got {value[:40]!r}")
        return value

    @model_validator(mode="after")
    def _limits(self) -> TemplateConfig:
        if len(self.variables) > 100:
            raise ValueError("at most 100 template variables")
        if any(len(str(value)) > 1600 for value in self.variables.values()):
            raise ValueError("a template variable is longer than 1600 characters")
        return self


@register
class WhatsAppSend(Node):
    """Send a WhatsApp message (text, media or template); consent, 24-hour window and pacing are enforced."""

    type = "whatsapp.send"
    idempotent = True  # once per (execution, node): a send record answers a repeat
    retry = RetryPolicy(max_attempts=6, backoff=2.0, max_backoff=600.0)
    timeout = 60.0
    services = ("whatsapp",)

    class Config(NodeConfig):
        to: str = Field(description="Recipient, E.164 (+14155550100); the whatsapp: prefix is added.")
        body: str | None = Field(None, min_length=1, max_length=1600, description="Text, 1-1600 characters.")
        media: list[str] = Field(default_factory=list, max_length=10, description="Up to 10 public http(s) media URLs.")
        template: TemplateConfig | None = Field(
            None, description="Template used instead of body outside the 24-hour window (or alone)."
        )
        from_: str | None = Field(None, alias="from", description="Sender, E.164; default TWILIO_WHATSAPP_NUMBER.")

        @model_validator(mode="after")
        def _something_to_send(self) -> WhatsAppSend.Config:
            if self.body is None and not self.media and self.template is None:
                raise ValueError("give a body, media or a template")
            bad = [url for url in self.media if not url.startswith(("https://", "http://"))]
            if bad:
                raise ValueError(f"media must be http(s) URLs, got {bad[0][:80]!r}")
            return self

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        try:
            sender = ctx.services.get("whatsapp")
        except KeyError:
            raise NodeError("no whatsapp service in this runtime", code="service-missing") from None
        result: dict[str, Any] = await sender.send(
            to=config.to,
            body=config.body,
            media=config.media,
            template=config.template.model_dump() if config.template else None,
            from_=config.from_ or "",
            flow=ctx.flow,
            execution=ctx.execution_id,
            node=ctx.node_id,
            first_run=ctx.first_run,
        )
        return result
