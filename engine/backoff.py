"""Backoff for loops that lost Redis: pause, doubling up to a ceiling, and say so once.

Every loop of a process (readers, lease renewal, mover, scheduler) has its own
:class:`Backoff`, but they share one :data:`REDIS` link state: "Redis unreachable"
is logged once when the first loop loses it and "reachable again" once when one
gets through, however many loops retry in between (and they are counted for
``/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

log = logging.getLogger("flowchat.backoff")


class RedisLink:
    """Whether this process reaches Redis, logged once per change, with error and reconnect counts."""

    def __init__(self) -> None:
        self.up = True
        self.since = time.monotonic()
        self.errors = 0
        self.reconnects = 0

    def failed(self, why: str, ceiling: float) -> None:
        self.errors += 1
        if self.up:
            self.up, self.since = False, time.monotonic()
            log.warning(
                "redis unreachable: %s; retrying every %.0fs at most (logged again when it is back)", why, ceiling
            )
        else:
            log.debug("still retrying: %s", why)

    def succeeded(self) -> None:
        if not self.up:
            self.up = True
            self.reconnects += 1
            log.warning("redis reachable again after %.1fs", time.monotonic() - self.since)
            self.since = time.monotonic()


REDIS = RedisLink()
"""This process's Redis link state (one per process: every loop reports to it)."""


class Backoff:
    """Exponential pause for loops that lost Redis: 50 ms doubling to 2 s."""

    def __init__(self, first: float = 0.05, ceiling: float = 2.0) -> None:
        self.first, self.ceiling, self.current = first, ceiling, first
        self._failing = False

    def reset(self) -> None:
        """Back to the first pause (call after a success)."""
        self.current = self.first
        if self._failing:
            self._failing = False
            REDIS.succeeded()

    async def wait(self, why: str) -> None:
        """Sleep the current pause, then double it; the first failure of the process's link is logged."""
        self._failing = True
        REDIS.failed(why, self.ceiling)
        await asyncio.sleep(self.current)
        self.current = min(self.ceiling, self.current * 2)


async def retrying(call: Callable[[], Awaitable[None]], stopping: asyncio.Event) -> None:
    """Await ``call`` until it succeeds (backing off while Redis is unreachable) or ``stopping`` is set."""
    backoff = Backoff()
    while not stopping.is_set():
        try:
            await call()
            backoff.reset()
            return
        except (RedisError, OSError) as exc:
            await backoff.wait(str(exc))
