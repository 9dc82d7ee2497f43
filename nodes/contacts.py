"""Contact nodes: look up, upsert, update, tag and record consent, over the ``contacts`` service.

Each change is one atomic script in Redis (see ``flowchat.contacts``): concurrent executions
never lose a tag, and only one of two upserts of a new phone reports ``created: true``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from flowchat import Node, NodeConfig, NodeContext, NodeError, RetryableError, RetryPolicy, register

_RETRY = RetryPolicy(max_attempts=3, backoff=0.5, max_backoff=10.0)
_LOOKUP_KEYS = ("phone", "name", "attributes", "tags", "groups", "consent", "created_at", "last_inbound_at")


def contacts(ctx: NodeContext) -> Any:
    try:
        return ctx.services.get("contacts")
    except KeyError:
        raise NodeError("no contacts service in this runtime (it needs Redis)", code="service-missing") from None


async def call(work: Any) -> Any:
    """Await a contacts call; Redis trouble is retryable, a NodeError (invalid-phone …) passes."""
    try:
        return await work
    except NodeError:
        raise
    except (OSError, TimeoutError) as exc:
        raise RetryableError(f"contacts unavailable: {exc}", code="contacts-unavailable") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            raise RetryableError(f"contacts unavailable: {exc}", code="contacts-unavailable") from exc
        raise


def shown(contact: dict[str, Any]) -> dict[str, Any]:
    return {key: contact.get(key) for key in _LOOKUP_KEYS}


@register
class ContactLookup(Node):
    """Find a contact by phone; `found` is false (and the rest empty) for a new number."""

    type = "contact.lookup"
    idempotent = True
    retry = _RETRY
    services: ClassVar[tuple[str, ...]] = ("contacts",)

    class Config(NodeConfig):
        phone: str = Field(description="Phone number (E.164, national with FLOWCHAT_DEFAULT_REGION, whatsapp: ok).")

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        book = contacts(ctx)
        phone = book.phone(config.phone)
        contact = await call(book.get(phone))
        if contact is None:
            return {"found": False, **shown({**_EMPTY, "phone": phone})}
        return {"found": True, **shown(contact)}


_EMPTY: dict[str, Any] = {
    "name": None,
    "attributes": {},
    "tags": [],
    "groups": [],
    "consent": {"state": "unknown", "at": None, "source": None},
    "created_at": None,
    "last_inbound_at": None,
}


@register
class ContactUpsert(Node):
    """Create a contact or update its name and attributes; `created` is true only the first time."""

    type = "contact.upsert"
    idempotent = True
    retry = _RETRY
    services: ClassVar[tuple[str, ...]] = ("contacts",)

    class Config(NodeConfig):
        phone: str = Field(description="Phone number of the contact.")
        name: str | None = Field(None, description="Display name.")
        attributes: dict[str, Any] | None = Field(None, description="Attributes merged into the contact's.")

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        contact, created = await call(
            contacts(ctx).upsert(config.phone, name=config.name, attributes=config.attributes, origin=ctx)
        )
        return {**shown(contact), "created": created}


@register
class ContactUpdate(Node):
    """Update a contact: attributes merged, `unset` keys removed (the contact is created if new)."""

    type = "contact.update"
    idempotent = True
    retry = _RETRY
    services: ClassVar[tuple[str, ...]] = ("contacts",)

    class Config(NodeConfig):
        phone: str = Field(description="Phone number of the contact.")
        name: str | None = Field(None, description="New display name.")
        attributes: dict[str, Any] | None = Field(None, description="Attributes merged into the contact's.")
        unset: list[str] = Field(default_factory=list, description="Attribute names to remove.")

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        contact = await call(
            contacts(ctx).update(
                config.phone, name=config.name, attributes=config.attributes, unset=config.unset, origin=ctx
            )
        )
        return shown(contact)


@register
class ContactTag(Node):
    """Add and remove tags and groups of a contact (created if new); reports what changed."""

    type = "contact.tag"
    idempotent = True
    retry = _RETRY
    services: ClassVar[tuple[str, ...]] = ("contacts",)

    class Config(NodeConfig):
        phone: str = Field(description="Phone number of the contact.")
        add: list[str] = Field(default_factory=list, description="Tags to add.")
        remove: list[str] = Field(default_factory=list, description="Tags to remove.")
        groups_add: list[str] = Field(default_factory=list, description="Groups to join.")
        groups_remove: list[str] = Field(default_factory=list, description="Groups to leave.")

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        applied = await call(
            contacts(ctx).tag(
                config.phone, config.add, config.remove, config.groups_add, config.groups_remove, origin=ctx
            )
        )
        return {
            "tags": applied.contact["tags"],
            "groups": applied.contact["groups"],
            "added": applied.tags_added,
            "removed": applied.tags_removed,
        }


@register
class ContactConsent(Node):
    """Record a contact's opt-in or opt-out with its source and time (created if new)."""

    type = "contact.consent"
    retry = _RETRY
    services: ClassVar[tuple[str, ...]] = ("contacts",)

    class Config(NodeConfig):
        phone: str = Field(description="Phone number of the contact.")
        state: Literal["opted_in", "opted_out"] = Field(description="opted_in or opted_out.")
        source: str = Field(min_length=1, description="Where the consent came from (web-form, keyword, agent …).")

    async def run(self, ctx: NodeContext, config: Config) -> dict[str, Any]:
        contact = await call(contacts(ctx).set_consent(config.phone, config.state, config.source, origin=ctx))
        return shown(contact)
