"""Schedule triggers: fire each cron tick exactly once across any number of replicas.

Every replica computes the same ticks; each enqueues a tick with the
idempotency key ``tick:<wall-clock time in the flow's timezone>``, so the queue's
dedupe lets exactly one execution through however many replicas fire it (and a
tick repeated by a DST fall-back fires once, as cron does). The last tick fired
is kept per flow under :meth:`Keys.schedule_last`.

Ticks missed while no replica ran are *coalesced*: on start, if the most recent
due tick is newer than the last one fired (kept in Redis), it fires once with
``trigger.missed`` = the number of ticks skipped; older missed ticks are not
replayed one by one. A flow first seen by the scheduler does not fire for the
past.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter
from redis.exceptions import RedisError

from flowchat.backoff import REDIS
from flowchat.catalog import Catalog
from flowchat.errors import FlowChatError
from flowchat.flow import Flow
from flowchat.queue import Queue

log = logging.getLogger("flowchat.scheduler")


def ticks_between(cron: str, timezone: str, after: float, until: float, limit: int = 100_000) -> list[float]:
    """Tick times in (after, until], as epoch seconds; at most the first ``limit`` of them."""
    start = datetime.fromtimestamp(after, ZoneInfo(timezone))
    itr = croniter(cron, start)
    ticks: list[float] = []
    while True:
        tick = float(itr.get_next(float))
        if tick > until:
            return ticks
        ticks.append(tick)
        if len(ticks) >= limit:
            return ticks


def next_tick(cron: str, timezone: str, after: float) -> float:
    return float(croniter(cron, datetime.fromtimestamp(after, ZoneInfo(timezone))).get_next(float))


def latest_tick(cron: str, timezone: str, at: float) -> float:
    """The most recent tick at or before ``at``, found directly however long ago the last one fired."""
    probe = croniter(cron, datetime.fromtimestamp(at + 0.001, ZoneInfo(timezone)))
    return float(probe.get_prev(float))


MISSED_COUNT_CAP = 10_000


class Scheduler:
    def __init__(self, queue: Queue, catalog: Catalog) -> None:
        self.queue = queue
        self.catalog = catalog

    async def run(self) -> None:
        while True:
            try:
                wake = await self.tick(time.time())
            except (RedisError, OSError, FlowChatError) as exc:
                REDIS.failed(f"scheduler: {exc}", 1.0)  # logged once per outage, not once a second
                wake = time.time() + 1
            except Exception:
                log.exception("scheduler tick failed; trying again in a second")
                wake = time.time() + 1
            await asyncio.sleep(min(1.0, max(0.01, wake - time.time())))

    async def tick(self, now: float) -> float:
        """Fire what is due at ``now``; return when the next tick is due."""
        next_wake = now + 60
        for flow in self.catalog.by_trigger("schedule"):
            next_wake = min(next_wake, await self._fire_due(flow, now))
        return next_wake

    async def _fire_due(self, flow: Flow, now: float) -> float:
        trigger = flow.trigger
        key = self.queue.keys.schedule_last(flow.name)
        last = await self.queue.redis.get(key)
        if last is None:
            # first sight: start from now, never fire for the past
            await self.queue.redis.set(key, now, nx=True)
            return next_tick(trigger.cron, trigger.timezone, now)
        tick = latest_tick(trigger.cron, trigger.timezone, now)
        if tick > float(last):
            # after a long outage this counts at most MISSED_COUNT_CAP ticks: never a blocking loop
            skipped = ticks_between(trigger.cron, trigger.timezone, float(last), tick, limit=MISSED_COUNT_CAP)
            missed = len(skipped) - 1
            payload = {**trigger.payload, "tick": datetime.fromtimestamp(tick, UTC).isoformat(), "missed": missed}
            await self.queue.store_flow(flow)
            # keyed by wall-clock time: a tick repeated by a DST fall-back fires once, as cron does
            wall = datetime.fromtimestamp(tick, ZoneInfo(trigger.timezone)).replace(tzinfo=None).isoformat()
            execution_id, created = await self.queue.enqueue(
                flow.name, flow.version, payload, idempotency_key=f"tick:{wall}"
            )
            await self.queue.redis.set(key, tick)
            if created:
                log.info(
                    "schedule %s fired tick %s (%d missed) as %s",
                    flow.name,
                    payload["tick"],
                    missed,
                    execution_id,
                )
        return next_tick(trigger.cron, trigger.timezone, now)
