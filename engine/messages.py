"""The message ledger: every WhatsApp message FlowChat sent (or simulated), and its delivery status.

Guarantees:

- **A send is recorded before its node's checkpoint.** :meth:`Ledger.record_send`
  writes the message, the index entry and the *send record* (execution + node →
  sid) in one script, right after Twilio answers; ``whatsapp.send`` looks the send
  record up first, so a resumed or replayed execution never sends again. The one
  window left is a crash between Twilio's answer and that write (one round trip).
- **Status only moves forward.** ``simulated < queued/accepted/scheduled < sending
  < sent < delivered < read``; ``failed``, ``undelivered`` and ``canceled`` are
  terminal, and cannot follow ``delivered`` or ``read``. :meth:`Ledger.advance` applies a status callback atomically and says
  whether it changed anything, so late or repeated callbacks are no-ops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from flowchat.codec import dumps
from flowchat.keys import Keys
from flowchat.pipeliner import Pipeliner

SEND_RECORD_TTL = 30 * 24 * 3600
"""How long a node's send record is kept (longer than any execution is retained or replayed)."""

STATUS_RANK: dict[str, int] = {
    "simulated": 0,
    "accepted": 1,
    "queued": 1,
    "scheduled": 1,
    "sending": 2,
    "sent": 3,
    "delivered": 4,
    "partially_delivered": 4,
    "read": 5,
    "failed": 9,
    "undelivered": 9,
    "canceled": 9,
}
TERMINAL = 9

_RANKS_LUA = "local rank = {" + ", ".join(f"{name}={value}" for name, value in STATUS_RANK.items()) + "}\n"

# KEYS: message hash, send record (or a dummy when none), index.
# ARGV: sid, the node's output as JSON for the send record ('' for none), ttl, then field pairs.
# A status callback may have arrived before this (Twilio is fast): never move its status back.
# The fields (a dozen) go in one HSET.
_RECORD_SEND = (
    _RANKS_LUA
    + """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local old = redis.call('HGET', KEYS[1], 'status')
local fields = {'updated_at', now}
for i = 4, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if not (name == 'status' and old and (rank[old] or 3) >= (rank[value] or 3)) then
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSETNX', KEYS[1], 'created_at', now)
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3]) end
redis.call('ZADD', KEYS[3], 'NX', now, ARGV[1])
return now
"""
)

# KEYS: message hash, index. ARGV: sid, status, error code, error message, to, from.
# Returns the message's fields after a real change, or nothing when the callback changes nothing.
_ADVANCE = (
    _RANKS_LUA
    + """
local old = redis.call('HGET', KEYS[1], 'status')
local new = rank[ARGV[2]] or 3
if old then
  local before = rank[old] or 3
  if before >= 9 or new <= before then return false end
  if new >= 9 and before >= 4 then return false end  -- delivered or read cannot fail afterwards
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if not old then
  redis.call('HSET', KEYS[1], 'sid', ARGV[1], 'direction', 'outbound', 'to', ARGV[5], 'from', ARGV[6],
             'created_at', now)
  redis.call('ZADD', KEYS[2], 'NX', now, ARGV[1])
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'updated_at', now, 'at:' .. ARGV[2], now, 'previous', old or '')
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error_code', ARGV[3], 'error_message', ARGV[4]) end
return redis.call('HGETALL', KEYS[1])
"""
)


# KEYS: message hash, index. ARGV: sid, then field pairs. 1 when new, 0 for a repeated MessageSid.
_RECORD_INBOUND = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'created_at', now, 'updated_at', now)
redis.call('ZADD', KEYS[2], 'NX', now, ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class SentBy:
    """Which flow, execution and node sent a message."""

    flow: str = ""
    execution: str = ""
    node: str = ""


_SCRIPTS = {"record": _RECORD_SEND, "advance": _ADVANCE, "inbound": _RECORD_INBOUND}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(reply: Any) -> dict[str, str]:
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    items = [_text(item) for item in reply or []]
    return dict(zip(items[::2], items[1::2], strict=True))


class Ledger:
    """The message ledger on Redis (keys in the ``whatsapp`` section of :mod:`flowchat.keys`)."""

    def __init__(self, redis: Redis, keys: Keys | None = None) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.pipeliner = Pipeliner.shared(redis)  # a send's reads and record ride the worker's round trips
        self._scripts = {name: redis.register_script(text) for name, text in _SCRIPTS.items()}

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]
        try:
            return await self.pipeliner.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.redis.script_load(script.script)
            return await self.pipeliner.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def record_inbound(self, sid: str, fields: dict[str, Any]) -> bool:
        """Record an inbound message (status ``received``); False when this MessageSid was seen before."""
        flat: list[str] = []
        for name, value in {**fields, "sid": sid, "direction": "inbound", "status": "received"}.items():
            flat += [name, _field(value)]
        return bool(await self._script("inbound", [self.keys.message(sid), self.keys.messages], [sid, *flat]))

    async def sent(self, execution_id: str, node_id: str) -> dict[str, Any] | None:
        """What this node of this execution already sent (``{sid, status, to, used_template}``), if anything."""
        if not execution_id:
            return None
        raw = await self.pipeliner.execute("GET", self.keys.send_record(execution_id, node_id))
        if raw is None:
            return None
        text = _text(raw)
        if not text.startswith("{"):  # a bare sid (older records)
            return {"sid": text, "status": "queued", "to": "", "used_template": False}
        found: dict[str, Any] = json.loads(text)
        return found

    async def record_send(self, message: dict[str, Any], by: SentBy, output: dict[str, Any] | None = None) -> None:
        """Record an outbound message, and the node's send record (its ``output``), right after the provider answered."""
        sid = str(message["sid"])
        fields = {**message, "direction": "outbound", "flow": by.flow, "execution": by.execution, "node": by.node}
        flat: list[str] = []
        for name, value in fields.items():
            if value is not None:
                flat += [name, _field(value)]
        has_record = bool(by.execution)
        record_key = self.keys.send_record(by.execution, by.node) if has_record else self.keys.send_record("-", "-")
        record = dumps(output or {"sid": sid, "status": fields.get("status", "")}) if has_record else ""
        keys = [self.keys.message(sid), record_key, self.keys.messages]
        await self._script("record", keys, [sid, record, SEND_RECORD_TTL, *flat])

    async def advance(
        self, sid: str, status: str, *, error_code: str = "", error_message: str = "", to: str = "", from_: str = ""
    ) -> dict[str, str] | None:
        """Apply a status callback; the message after a real change, None when nothing changed."""
        reply = await self._script(
            "advance", [self.keys.message(sid), self.keys.messages], [sid, status, error_code, error_message, to, from_]
        )
        return _pairs(reply) if reply else None

    async def get(self, sid: str) -> dict[str, str] | None:
        """One message by sid."""
        return _pairs(await self.pipeliner.execute("HGETALL", self.keys.message(sid))) or None

    async def recent(
        self, *, to: str = "", status: str = "", limit: int = 50, scan: int = 5000
    ) -> list[dict[str, str]]:
        """Newest messages first, optionally only to one phone or in one status."""
        sids = [_text(sid) for sid in await self.redis.zrevrange(self.keys.messages, 0, scan - 1)]
        found: list[dict[str, str]] = []
        for start in range(0, len(sids), 200):
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in sids[start : start + 200]:
                    pipe.hgetall(self.keys.message(sid))
                replies = await pipe.execute()
            for reply in replies:
                message = _pairs(reply)
                if message and (not to or message.get("to") == to) and (not status or message.get("status") == status):
                    found.append(message)
                    if len(found) >= limit:
                        return found
        return found


def _field(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
