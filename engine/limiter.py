"""Exact rate limits across workers and boxes: GCRA in one Lua script, timed by Redis ``TIME``.

A limit is ``limit`` events per ``per`` seconds with up to ``burst`` at once (default
``limit``). GCRA keeps one number per key, the theoretical arrival time (TAT): a request
at ``now`` conforms when ``TAT + T - burst·T <= now`` (``T = per / limit``), and moves the
TAT on by ``T``. So ``burst`` requests pass at once, then one every ``T``; no worker's clock
is ever read.

A caller that will wait (``rate_limit`` with ``on_limit: delay``, the WhatsApp sender) passes
a ``holder``: a refused request then *reserves* the next free slot — the TAT moves on as if it
had been allowed — and the holder is told to come back at that slot. When it returns, its
reservation is honoured once the slot's time has come (by Redis's clock), so parked executions
are allowed one per slot, in order, with no herd of retries.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from flowchat.keys import Keys
from flowchat.pipeliner import Pipeliner

RESERVATION_SLACK_MS = 3_600_000
"""A reservation outlives its slot by an hour, then expires (its holder gave up)."""

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tolerance = interval * burst
if ARGV[3] == '1' then
  local slot = redis.call('GET', KEYS[2])
  if slot then
    slot = tonumber(slot)
    if now >= slot then
      redis.call('DEL', KEYS[2])
      return {1, 0, 0}
    end
    return {0, math.ceil((slot - now) / 1000), 0}
  end
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next_tat = tat + interval
local allowed_at = next_tat - tolerance
local ttl = math.ceil((next_tat - now) / 1000) + 1000
if now < allowed_at then
  if ARGV[3] ~= '1' then return {0, math.ceil((allowed_at - now) / 1000), 0} end
  redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', ttl)
  redis.call('SET', KEYS[2], string.format('%d', allowed_at), 'PX', ttl + tonumber(ARGV[4]))
  return {0, math.ceil((allowed_at - now) / 1000), 0}
end
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', ttl)
return {1, 0, math.floor((now - allowed_at) / interval)}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    """The limiter's answer: allowed now, or retry after ``retry_after_ms``; ``remaining`` at once."""

    allowed: bool
    retry_after_ms: int
    remaining: int


class Limiter:
    """GCRA rate limits in Redis (service ``limiter``)."""

    def __init__(self, redis: Redis, keys: Keys | None = None) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.pipeliner = Pipeliner.shared(redis)
        self._acquire = redis.register_script(_ACQUIRE)
        self.owned: AsyncExitStack | None = None
        """A connection this service opened itself (``flowchat run``), closed with it."""

    async def acquire(
        self, key: str, limit: int, per_seconds: float, burst: int | None = None, *, holder: str | None = None
    ) -> Decision:
        """Take one slot of ``key`` if it conforms; with ``holder``, a refusal reserves the next slot."""
        if limit < 1 or per_seconds <= 0:
            raise ValueError("limit must be >= 1 and per_seconds > 0")
        interval = max(1, round(per_seconds * 1_000_000 / limit))  # µs between slots
        burst = limit if burst is None else max(1, burst)
        keys = [self.keys.limit(key), self.keys.limit_reservation(key, holder or "-")]
        args = [interval, burst, "1" if holder else "0", RESERVATION_SLACK_MS]
        try:
            reply = await self.pipeliner.execute("EVALSHA", self._acquire.sha, 2, *keys, *args)
        except NoScriptError:
            await self.redis.script_load(_ACQUIRE)
            reply = await self.pipeliner.execute("EVALSHA", self._acquire.sha, 2, *keys, *args)
        allowed, retry_after_ms, remaining = (int(x) for x in reply)
        return Decision(allowed == 1, retry_after_ms, remaining)

    async def aclose(self) -> None:
        if self.owned is not None:
            await self.owned.aclose()


def parse_rate(text: str) -> tuple[int, float]:
    """``"80/1s"`` → (80, 1.0): a limit and its period (used by settings such as FLOWCHAT_SEND_RATE)."""
    from flowchat.durations import parse_duration

    count, _, period = text.partition("/")
    return int(count), parse_duration(period or "1s")
