"""The flow file format, as pydantic models (the contract flow authors write).

The JSON Schema of these models, plus every node type's ``with``, is what
``flowchat schema`` prints for editors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from flowchat.durations import Duration
from flowchat.fields import JsonSchema
from flowchat.node import RetryPolicy

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
FLOW_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MessageMatch(_Strict):
    """Which inbound messages start a flow; keys combine with AND."""

    body: str | None = Field(
        None, description="Regular expression searched in Body, case-insensitive (RE2 syntax: linear time)."
    )
    keywords: list[str] | None = Field(None, description="Any of these whole words or phrases, case-insensitive.")
    button: list[str] | str | None = Field(None, description="Quick-reply ButtonPayload(s).")
    from_: list[str] | str | None = Field(None, alias="from", description="Sender phone(s), E.164.")
    default: bool = Field(False, description="Run only when no other flow's `match:` fitted the message.")

    _body: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> MessageMatch:
        if self.default and (self.body or self.keywords or self.button or self.from_):
            raise ValueError("`default: true` stands alone: it fits when no other flow's match: did")
        if not self.default and not (self.body or self.keywords or self.button or self.from_):
            raise ValueError("give at least one of body, keywords, button, from (or default: true)")
        if self.body is not None:
            import re2

            try:
                self._body = re2.compile(self.body, _re2_options())
            except re2.error as exc:
                raise ValueError(f"body is not a valid RE2 regular expression: {exc}") from None
        return self

    @property
    def body_regex(self) -> Any:
        return self._body


def _re2_options() -> Any:
    import re2

    options = re2.Options()
    options.case_sensitive = False
    options.max_mem = 8 << 20  # a pathological pattern fails at load time, not at ingress
    return options


class StatusMatch(_Strict):
    """Which delivery statuses start a flow."""

    status: list[str] = Field(min_length=1, description="Statuses: queued, sent, delivered, read, failed, undelivered…")


class TwilioMessageTrigger(_Strict):
    """An inbound WhatsApp message, posted by Twilio to ``/twilio/message``."""

    type: Literal["twilio.message"]
    to: str | None = Field(None, description="Only messages sent to this number (E.164, optionally whatsapp:).")
    auth_token_env: str = Field("TWILIO_AUTH_TOKEN", description="Env var holding the auth token for signatures.")
    match: MessageMatch | None = Field(None, description="Only messages that fit (body, keywords, button, from).")


class TwilioStatusTrigger(_Strict):
    """A delivery status callback, posted by Twilio to ``/twilio/status``; runs on each real status change."""

    type: Literal["twilio.status"]
    auth_token_env: str = Field("TWILIO_AUTH_TOKEN", description="Env var holding the auth token for signatures.")
    match: StatusMatch | None = Field(None, description="Only these statuses.")


class WebhookTrigger(_Strict):
    """Any HTTP caller, ``POST /hooks/{path}`` with a JSON or form body."""

    type: Literal["webhook"]
    path: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$", description="Defaults to the flow name.")
    schema_: JsonSchema | None = Field(None, alias="schema", description="JSON Schema the body must satisfy.")
    secret_env: str | None = Field(None, description="Env var with the HMAC-SHA256 secret (X-FlowChat-Signature).")
    token_env: str | None = Field(None, description="Env var with the bearer token (Authorization: Bearer).")
    max_body: int = Field(1024 * 1024, ge=1, description="Largest accepted body in bytes.")


class ScheduleTrigger(_Strict):
    """A cron schedule; each tick fires once across all replicas."""

    type: Literal["schedule"]
    cron: str = Field(description="Five-field cron expression, e.g. '*/5 * * * *'.")
    timezone: str = Field("UTC", description="IANA time zone the cron is read in.")
    payload: dict[str, Any] = Field(default_factory=dict, description="Trigger data for each run.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"not a five-field cron expression: {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


Trigger = Annotated[
    TwilioMessageTrigger | TwilioStatusTrigger | WebhookTrigger | ScheduleTrigger,
    Field(discriminator="type"),
]


class NodeSpec(_Strict):
    """One entry of ``nodes``."""

    id: str = Field(pattern=IDENTIFIER, description="Unique in the flow; templates read its output by this name.")
    type: str = Field(description="A node type (see `flowchat nodes`).")
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", description="The node's config; strings are templates."
    )
    needs: list[str] | None = Field(None, description="Nodes this one waits for; default: the node above it.")
    when: str | bool | None = Field(None, description="Condition; false skips this node and nodes needing only it.")
    retry: RetryPolicy | None = Field(None, description="Retry policy; defaults per node type.")
    timeout: Duration | None = Field(None, description="Longest one attempt may take; defaults per node type.")


class FlowSpec(_Strict):
    """A flow file."""

    flow: str = Field(pattern=FLOW_NAME, description="Unique flow name.")
    description: str = ""
    vars: dict[str, Any] = Field(default_factory=dict, description="Constants for templates (vars.NAME).")
    trigger: Trigger
    nodes: list[Any] = Field(min_length=1, description="The graph, in order.")
