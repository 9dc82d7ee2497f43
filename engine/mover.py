"""The delayed-work mover: waiting executions go back onto the ready stream when due.

Retry backoff and ``delay`` nodes park an execution in the delayed sorted set
(:meth:`Queue.finish`); one mover per process moves due ones back with an atomic
Lua script, so any number of movers may run at once.
"""

from __future__ import annotations

import asyncio
import time

from redis.exceptions import RedisError

from flowchat.backoff import Backoff
from flowchat.queue import Queue


class DelayedMover:
    """Moves due work from the delayed set to the ready stream, sleeping until the next is due.

    Once a minute it also drops index entries of executions past their retention.
    """

    def __init__(self, queue: Queue, max_sleep: float = 0.25, housekeeping_every: float = 60.0) -> None:
        self.queue = queue
        self.max_sleep = max_sleep
        self.housekeeping_every = housekeeping_every

    async def run(self) -> None:
        """Move due work until cancelled; Redis outages are waited out with a backoff."""
        backoff = Backoff()
        next_housekeeping = time.monotonic()
        while True:
            try:
                if time.monotonic() >= next_housekeeping:
                    await self.queue.forget_expired()
                    next_housekeeping = time.monotonic() + self.housekeeping_every
                moved = await self.queue.move_due()
                backoff.reset()
                if moved:
                    continue
                due = await self.queue.next_due()
                pause = self.max_sleep if due is None else min(self.max_sleep, max(0.005, due - time.time()))
                await asyncio.sleep(pause)
            except (RedisError, OSError) as exc:
                await backoff.wait(f"moving delayed work: {exc}")
