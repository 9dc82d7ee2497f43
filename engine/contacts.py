"""The contact book: one Redis hash per contact, keyed by E.164 phone.

Storage (all under the hash tag ``{<queue>:contacts}``, see :class:`~flowchat.keys.Keys`):
the contact hash holds ``phone``, ``name``, ``created_at``/``updated_at``/``last_inbound_at``
(epoch ms), ``consent_state``/``consent_at``/``consent_source``, one field ``a:<name>`` per
attribute (its JSON), ``t:<tag>`` per tag and ``g:<group>`` per group. Beside it: the audit
list (last 100 changes), the set of all phones, the opted-out set and one set per tag and
group (the indexes search reads).

Every change — upsert, update, tag, consent, an inbound message — is one Lua script over
keys the caller names, so concurrent workers never lose a tag or both create a contact.
Times come from Redis ``TIME``. A change that changes nothing writes no audit entry and
emits no event, so a re-import is idempotent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, WatchError

from flowchat.errors import NodeError
from flowchat.events import CLI, Event, Events, Origin, entry, now_ms, origin_of
from flowchat.keys import Keys
from flowchat.phones import normalize
from flowchat.pipeliner import Pipeliner

AUDIT_KEPT = 100
INBOUND_TTL = 7 * 24 * 3600
CONSENT_STATES = ("opted_in", "opted_out", "unknown")
MAX_NAME = 200

_APPLY = """
local spec = cjson.decode(ARGV[1])
local key, phone = KEYS[1], spec.phone
if spec.inbound then
  if not redis.call('SET', KEYS[5], phone, 'NX', 'EX', spec.inbound.ttl) then
    return {2, redis.call('HGETALL', key), {}, {}, {}, {}, {}, {}, 0, ''}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamp = string.format('%d', now)
local created = redis.call('EXISTS', key) == 0
if created then
  redis.call('HSET', key, 'phone', phone, 'name', '', 'created_at', stamp, 'updated_at', stamp, 'consent_state', 'unknown')
  redis.call('ZADD', KEYS[3], stamp, phone)
end
local renamed = 0
if type(spec.name) == 'string' then
  local old = redis.call('HGET', key, 'name') or ''
  if old ~= spec.name and (not spec.name_if_empty or old == '') then
    redis.call('HSET', key, 'name', spec.name)
    renamed = 1
  end
end
local set, unset = {}, {}
for _, pair in ipairs(spec.set or {}) do
  if redis.call('HGET', key, 'a:' .. pair[1]) ~= pair[2] then
    redis.call('HSET', key, 'a:' .. pair[1], pair[2])
    table.insert(set, pair[1])
  end
end
for _, name in ipairs(spec.unset or {}) do
  if redis.call('HDEL', key, 'a:' .. name) == 1 then table.insert(unset, name) end
end
local index = 5
local function apply(names, prefix, add)
  local done = {}
  for _, name in ipairs(names or {}) do
    index = index + 1
    if add then
      if redis.call('HSETNX', key, prefix .. name, '1') == 1 then table.insert(done, name) end
      redis.call('SADD', KEYS[index], phone)
    else
      if redis.call('HDEL', key, prefix .. name) == 1 then table.insert(done, name) end
      redis.call('SREM', KEYS[index], phone)
    end
  end
  return done
end
local tagged = apply(spec.tags_add, 't:', true)
local untagged = apply(spec.tags_remove, 't:', false)
local grouped = apply(spec.groups_add, 'g:', true)
local ungrouped = apply(spec.groups_remove, 'g:', false)
local consent = ''
if spec.consent and redis.call('HGET', key, 'consent_state') ~= spec.consent.state then
  consent = spec.consent.state
  redis.call('HSET', key, 'consent_state', consent, 'consent_at', stamp, 'consent_source', spec.consent.source)
  if consent == 'opted_out' then redis.call('SADD', KEYS[4], phone) else redis.call('SREM', KEYS[4], phone) end
end
if spec.inbound then
  local last = tonumber(redis.call('HGET', key, 'last_inbound_at') or '0')
  if spec.inbound.at > last then redis.call('HSET', key, 'last_inbound_at', string.format('%d', spec.inbound.at)) end
end
local changed = renamed + #set + #unset + #tagged + #untagged + #grouped + #ungrouped
if consent ~= '' then changed = changed + 1 end
if changed > 0 and not created then redis.call('HSET', key, 'updated_at', stamp) end
if changed > 0 or created then
  local audit = {at = now, action = spec.action, source = spec.source}
  if created then audit.created = true end
  if renamed == 1 then audit.name = spec.name end
  if #set > 0 then audit.set = set end
  if #unset > 0 then audit.unset = unset end
  if #tagged > 0 then audit.tags_added = tagged end
  if #untagged > 0 then audit.tags_removed = untagged end
  if #grouped > 0 then audit.groups_added = grouped end
  if #ungrouped > 0 then audit.groups_removed = ungrouped end
  if consent ~= '' then audit.consent = consent end
  redis.call('LPUSH', KEYS[2], cjson.encode(audit))
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
end
return {created and 1 or 0, redis.call('HGETALL', key), tagged, untagged, grouped, ungrouped, set, unset, renamed, consent}
"""


@dataclass
class Change:
    """What one call asks for; empty fields change nothing."""

    phone: str
    action: str
    source: str = ""
    name: str | None = None
    name_if_empty: bool = False
    attributes: Mapping[str, Any] = field(default_factory=dict)
    unset: Iterable[str] = ()
    tags_add: Iterable[str] = ()
    tags_remove: Iterable[str] = ()
    groups_add: Iterable[str] = ()
    groups_remove: Iterable[str] = ()
    consent: str | None = None
    inbound_sid: str | None = None
    inbound_at: int = 0


@dataclass(frozen=True, slots=True)
class Applied:
    """What a change did: the contact after it, and exactly what moved."""

    contact: dict[str, Any]
    created: bool
    duplicate: bool
    tags_added: list[str]
    tags_removed: list[str]
    groups_added: list[str]
    groups_removed: list[str]
    updated: bool
    consent: str


class Contacts:
    """The contact book (service ``contacts``)."""

    def __init__(
        self, redis: Redis, keys: Keys | None = None, *, default_region: str = "", events: Events | None = None
    ) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.default_region = default_region
        self.events = events
        self.pipeliner = Pipeliner.shared(redis)
        self._apply = redis.register_script(_APPLY)
        self.owned: AsyncExitStack | None = None
        """A connection this service opened itself (``flowchat run``), closed with it."""
        self.owns_events = False
        """True when this service started the events service (and closes it)."""

    def phone(self, raw: str) -> str:
        """``raw`` normalised to E.164 (``invalid-phone`` otherwise)."""
        return normalize(raw, self.default_region)

    # --- reading ----------------------------------------------------------------------

    async def get(self, phone: str) -> dict[str, Any] | None:
        """The contact (the keys of ``contact.lookup``'s output, without ``found``), or None."""
        # through the pipeline: whatsapp.send reads the contact on every send
        reply = await self.pipeliner.execute("HGETALL", self.keys.contact(self.phone(phone)))
        return contact_from_fields(_pairs(reply)) if reply else None

    async def details(self, phone: str, audit: int = 10) -> dict[str, Any] | None:
        """The contact with ``updated_at`` and its last ``audit`` changes (newest first)."""
        e164 = self.phone(phone)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.contact(e164))
        pipe.lrange(self.keys.contact_audit(e164), 0, max(audit, 1) - 1)
        fields, entries = await pipe.execute()
        if not fields:
            return None
        contact = contact_from_fields(fields)
        contact["updated_at"] = _int(_text_fields(fields).get("updated_at"))
        contact["audit"] = [orjson.loads(raw) for raw in entries[:audit]]
        return contact

    async def many(self, phones: list[str]) -> list[dict[str, Any]]:
        """Contacts for E.164 ``phones`` (missing ones left out), in one round trip."""
        if not phones:
            return []
        replies = await self.pipeliner.round_trip([("HGETALL", self.keys.contact(phone)) for phone in phones])
        return [contact_from_fields(_pairs(reply)) for reply in replies if reply and not isinstance(reply, Exception)]

    async def search(
        self, *, tags: Iterable[str] = (), groups: Iterable[str] = (), opted_out: bool = False, limit: int = 100
    ) -> list[str]:
        """Phones matching every filter, read from the tag, group and opted-out indexes (sorted)."""
        sets = [self.keys.contacts_tagged(t) for t in tags] + [self.keys.contacts_grouped(g) for g in groups]
        if opted_out:
            sets.append(self.keys.contacts_opted_out)
        if not sets:
            found = await self.redis.zrange(self.keys.contacts_all, 0, limit - 1)
            return [_text(phone) for phone in found]
        if len(sets) == 1:
            members = await self._scan_set(sets[0], limit)
        else:
            members = [_text(m) for m in await self.redis.sinter(sets)]  # type: ignore[misc]
        return sorted(members)[:limit]

    async def _scan_set(self, key: str, limit: int) -> list[str]:
        found: list[str] = []
        async for member in self.redis.sscan_iter(key, count=max(limit, 1000)):
            found.append(_text(member))
            if len(found) >= limit:
                break
        return found

    async def iterate(
        self, *, tags: Iterable[str] = (), groups: Iterable[str] = (), batch: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """Every contact (or those matching the filters), fetched ``batch`` at a time."""
        sets = [self.keys.contacts_tagged(t) for t in tags] + [self.keys.contacts_grouped(g) for g in groups]
        if sets:
            phones = sorted(_text(m) for m in await self.redis.sinter(sets))  # type: ignore[misc]
            for start in range(0, len(phones), batch):
                for contact in await self.many(phones[start : start + batch]):
                    yield contact
            return
        start = 0
        while True:
            chunk = [_text(p) for p in await self.redis.zrange(self.keys.contacts_all, start, start + batch - 1)]
            for contact in await self.many(chunk):
                yield contact
            if len(chunk) < batch:
                return
            start += batch

    async def count(self) -> int:
        return int(await self.redis.zcard(self.keys.contacts_all))

    # --- changing ---------------------------------------------------------------------

    async def upsert(
        self,
        phone: str,
        name: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        *,
        origin: Origin | Any = CLI,
    ) -> tuple[dict[str, Any], bool]:
        """Create or update; returns (contact, created) — created is true for exactly one caller."""
        applied = await self.apply(Change(self.phone(phone), "upsert", name=name, attributes=attributes or {}), origin)
        return applied.contact, applied.created

    async def update(
        self,
        phone: str,
        name: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        unset: Iterable[str] = (),
        *,
        origin: Origin | Any = CLI,
    ) -> dict[str, Any]:
        """Merge ``attributes``, remove ``unset`` keys, set ``name`` (creating the contact if new)."""
        change = Change(self.phone(phone), "update", name=name, attributes=attributes or {}, unset=unset)
        return (await self.apply(change, origin)).contact

    async def tag(
        self,
        phone: str,
        add: Iterable[str] = (),
        remove: Iterable[str] = (),
        groups_add: Iterable[str] = (),
        groups_remove: Iterable[str] = (),
        *,
        origin: Origin | Any = CLI,
    ) -> Applied:
        """Add and remove tags and groups (creating the contact if new)."""
        change = Change(
            self.phone(phone),
            "tag",
            tags_add=labels(add),
            tags_remove=labels(remove),
            groups_add=labels(groups_add),
            groups_remove=labels(groups_remove),
        )
        return await self.apply(change, origin)

    async def set_consent(self, phone: str, state: str, source: str, *, origin: Origin | Any = CLI) -> dict[str, Any]:
        """Record an opt-in or opt-out with its source; Redis stamps the time."""
        if state not in CONSENT_STATES:
            raise NodeError(f"consent state must be one of {', '.join(CONSENT_STATES)}", code="consent-invalid")
        change = Change(self.phone(phone), "consent", source=source, consent=state)
        return (await self.apply(change, origin)).contact

    async def record_inbound(
        self,
        phone: str,
        *,
        profile_name: str | None,
        message_sid: str,
        at_ms: int,
        consent: str | None = None,
        origin: Origin | Any = CLI,
    ) -> dict[str, Any]:
        """An inbound message: last inbound time, profile name if none, consent keyword; once per message."""
        change = Change(
            self.phone(phone),
            "inbound",
            source="inbound",
            name=profile_name or None,
            name_if_empty=True,
            consent=consent,
            inbound_sid=message_sid,
            inbound_at=int(at_ms),
        )
        applied = await self.apply(change, origin)
        return {"phone": change.phone, "created": applied.created, "consent": applied.contact["consent"]}

    async def apply(self, change: Change, origin: Origin | Any = CLI) -> Applied:
        """Run one change atomically and emit its events."""
        keys, args = self.command(change)
        try:
            reply = await self.pipeliner.execute("EVALSHA", self._apply.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.script_load(_APPLY)
            reply = await self.pipeliner.execute("EVALSHA", self._apply.sha, len(keys), *keys, *args)
        applied = applied_from_reply(reply)
        self.emit(applied, origin_of(origin), change.source)
        return applied

    def command(self, change: Change) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the apply script for ``change`` (every key it touches is named)."""
        phone = change.phone
        spec: dict[str, Any] = {"phone": phone, "action": change.action, "source": change.source}
        if change.name is not None:
            spec["name"] = _name(change.name)
            spec["name_if_empty"] = change.name_if_empty
        if change.attributes:
            spec["set"] = [[_attribute(k), _json(v)] for k, v in sorted(change.attributes.items())]
        if change.unset:
            spec["unset"] = [_attribute(k) for k in change.unset]
        named = self.keys
        contact = named.contact(phone)
        keys = [
            contact,
            named.contact_audit(phone),
            named.contacts_all,
            named.contacts_opted_out,
            named.contact_inbound(change.inbound_sid) if change.inbound_sid else contact,
        ]
        for name, values, key_of in (
            ("tags_add", change.tags_add, named.contacts_tagged),
            ("tags_remove", change.tags_remove, named.contacts_tagged),
            ("groups_add", change.groups_add, named.contacts_grouped),
            ("groups_remove", change.groups_remove, named.contacts_grouped),
        ):
            if values:  # the script reads a missing list as empty; KEYS follow the lists in this order
                spec[name] = labels(values)
                keys += [key_of(value) for value in spec[name]]
        if change.consent is not None:
            spec["consent"] = {"state": change.consent, "source": change.source}
        if change.inbound_sid:
            spec["inbound"] = {"ttl": INBOUND_TTL, "at": change.inbound_at}
        return keys, [orjson.dumps(spec).decode(), AUDIT_KEPT]

    async def erase(self, phone: str, *, origin: Origin | Any = CLI) -> bool:
        """Remove the contact, its index entries and audit trail; emits ``erased``. False if unknown."""
        e164 = self.phone(phone)
        key = self.keys.contact(e164)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    fields = _text_fields(await pipe.hgetall(key))  # type: ignore[misc]
                    if not fields:
                        await pipe.reset()
                        return False
                    pipe.multi()
                    pipe.delete(key, self.keys.contact_audit(e164))
                    pipe.zrem(self.keys.contacts_all, e164)
                    pipe.srem(self.keys.contacts_opted_out, e164)
                    for name in fields:
                        if name.startswith("t:"):
                            pipe.srem(self.keys.contacts_tagged(name[2:]), e164)
                        elif name.startswith("g:"):
                            pipe.srem(self.keys.contacts_grouped(name[2:]), e164)
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        if self.events is not None:
            self.events.emit("contact", origin_of(origin), {"action": "erased", "phone": e164})
        return True

    def emit(self, applied: Applied, origin: Origin, source: str = "") -> None:
        if self.events is None or not self.events.enabled or applied.duplicate:
            return
        self.events.emit_many(contact_events(applied, origin, source))

    async def aclose(self) -> None:
        if self.events is not None:
            await (self.events.aclose() if self.owns_events else self.events.flush())
        if self.owned is not None:
            await self.owned.aclose()


def contact_events(applied: Applied, origin: Origin, source: str = "") -> list[Event]:
    """One event per kind of change (created, updated, tagged, …) with the full phone."""
    phone = applied.contact["phone"]
    ts = now_ms()
    found: list[dict[str, Any]] = []
    if applied.created:
        found.append({"action": "created"})
    elif applied.updated:
        found.append({"action": "updated"})
    for action, key, values in (
        ("tagged", "tags", applied.tags_added),
        ("untagged", "tags", applied.tags_removed),
        ("grouped", "groups", applied.groups_added),
        ("ungrouped", "groups", applied.groups_removed),
    ):
        if values:
            found.append({"action": action, key: values})
    if applied.consent:
        found.append({"action": applied.consent, "source": source})
    return [entry("contact", origin, {**data, "phone": phone}, ts) for data in found]


def applied_from_reply(reply: list[Any]) -> Applied:
    created, flat, tagged, untagged, grouped, ungrouped, set_, unset, renamed, consent = reply
    strings = [[_text(x) for x in part] if part else [] for part in (tagged, untagged, grouped, ungrouped, set_, unset)]
    return Applied(
        contact=contact_from_fields(_pairs(flat)),
        created=int(created) == 1,
        duplicate=int(created) == 2,
        tags_added=strings[0],
        tags_removed=strings[1],
        groups_added=strings[2],
        groups_removed=strings[3],
        updated=bool(int(renamed) or strings[4] or strings[5]),
        consent=_text(consent),
    )


def contact_from_fields(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored hash as the contact dict flows see (one pass over its fields: every send reads one)."""
    fields: dict[str, str] = {}
    attributes: dict[str, Any] = {}
    tags: list[str] = []
    groups: list[str] = []
    for key, value in raw.items():
        name = key.decode() if type(key) is bytes else str(key)
        if name[1:2] == ":":
            kind = name[0]
            if kind == "a":
                attributes[name[2:]] = orjson.loads(value)
                continue
            if kind == "t":
                tags.append(name[2:])
                continue
            if kind == "g":
                groups.append(name[2:])
                continue
        fields[name] = value.decode() if type(value) is bytes else str(value)
    get = fields.get
    tags.sort()
    groups.sort()
    return {
        "phone": get("phone", ""),
        "name": get("name") or None,
        "attributes": dict(sorted(attributes.items())) if len(attributes) > 1 else attributes,
        "tags": tags,
        "groups": groups,
        "consent": {
            "state": get("consent_state", "unknown"),
            "at": _int(get("consent_at")),
            "source": get("consent_source") or None,
        },
        "created_at": _int(get("created_at")),
        "last_inbound_at": _int(get("last_inbound_at")),
    }


def labels(values: Iterable[str] | str | None) -> list[str]:
    """Tags or group names, trimmed, de-duplicated, in order; bad ones are errors."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        label = str(value).strip()
        if not label or len(label) > 100 or any(ch in label for ch in "\r\n\t;{}"):
            raise NodeError(
                f"invalid tag or group {label[:40]!r}: 1-100 characters, no ; {{ }} or control characters",
                code="contact-label-invalid",
            )
        if label not in out:
            out.append(label)
    return out


def _name(value: str) -> str:
    name = str(value).strip()
    if len(name) > MAX_NAME:
        raise NodeError(f"name longer than {MAX_NAME} characters", code="contact-name-invalid")
    return name


def _attribute(name: Any) -> str:
    text = str(name)
    if not text or len(text) > 100:
        raise NodeError(f"invalid attribute name {text[:40]!r}: 1-100 characters", code="contact-attribute-invalid")
    return text


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=str).decode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text_fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _pairs(flat: Any) -> dict[Any, Any]:
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _int(value: str | None) -> int | None:
    return int(float(value)) if value else None
