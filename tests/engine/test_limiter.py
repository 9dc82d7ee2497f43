"""flowchat.limiter: exact rate limits across workers (GCRA in Redis), reserved slots in order."""

from __future__ import annotations

import asyncio

from flowchat.keys import Keys
from flowchat.limiter import Limiter

KEYS = Keys("fc")


async def test_the_limiter_is_exact_and_reserved_slots_come_in_order(redis) -> None:
    limiter = Limiter(redis, KEYS)
    decisions = await asyncio.gather(*(limiter.acquire("k", 5, 60) for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 5
    assert sorted(d.remaining for d in decisions if d.allowed) == [0, 1, 2, 3, 4]
    assert min(d.retry_after_ms for d in decisions if not d.allowed) > 11_000
    waits = [await limiter.acquire("r", 2, 1, holder=f"h{n}") for n in range(6)]
    assert [d.allowed for d in waits] == [True, True, False, False, False, False]
    assert [round(d.retry_after_ms / 500) for d in waits[2:]] == [1, 2, 3, 4]  # one slot each, 0.5 s apart
    early = await limiter.acquire("r", 2, 1, holder="h2")
    assert not early.allowed and early.retry_after_ms > 0  # its slot has not come
    await asyncio.sleep(early.retry_after_ms / 1000 + 0.01)
    assert (await limiter.acquire("r", 2, 1, holder="h2")).allowed
    assert not (await limiter.acquire("r", 2, 1, holder="h3")).allowed
