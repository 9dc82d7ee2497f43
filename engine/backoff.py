"""Backoff for loops that lost Redis: pause, doubling, and say so when it gets long."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

log = logging.getLogger("flowchat.backoff")


class Backoff:
    """Exponential pause for loops that lost Redis: 50 ms doubling to 2 s."""

    def __init__(self, first: float = 0.05, ceiling: float = 2.0) -> None:
        self.first, self.ceiling, self.current = first, ceiling, first

    def reset(self) -> None:
        """Back to the first pause (call after a success)."""
        self.current = self.first

    async def wait(self, why: str) -> None:
        """Sleep the current pause, then double it; long pauses are logged with ``why``."""
        if self.current >= self.ceiling / 2:
            log.warning("retrying in %.1fs: %s", self.current, why)
        await asyncio.sleep(self.current)
        self.current = min(self.ceiling, self.current * 2)


async def retrying(call: Callable[[], Awaitable[None]], stopping: asyncio.Event) -> None:
    """Await ``call`` until it succeeds (backing off while Redis is unreachable) or ``stopping`` is set."""
    backoff = Backoff()
    while not stopping.is_set():
        try:
            await call()
            return
        except (RedisError, OSError) as exc:
            await backoff.wait(str(exc))
