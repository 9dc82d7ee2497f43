"""Schedule triggers: cron ticks fire exactly once across replicas, missed ticks coalesce, time zones count.

Every test drives ``Scheduler.tick(now)`` with explicit times: nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from support import write_flow

from flowchat.catalog import Catalog
from flowchat.keys import Keys
from flowchat.queue import Queue
from flowchat.scheduler import Scheduler, next_tick, ticks_between

EVERY_5_MIN = "*/5 * * * *"
NOOP = [{"id": "noop", "type": "test.noop"}]
T0 = datetime(2025, 1, 15, 12, 0, tzinfo=UTC).timestamp()
"""A Wednesday noon UTC: a tick of every cron used here."""


def at(year: int, month: int, day: int, hour: int = 0) -> float:
    """Epoch seconds of an hour in UTC."""
    return datetime(year, month, day, hour, tzinfo=UTC).timestamp()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


@pytest.fixture
def schedule_flow(flows_dir: Path, catalog_factory: Callable[[Path], Catalog]) -> Callable[..., Catalog]:
    """Write a schedule flow into the flows folder and return the catalog serving the folder."""

    def write(name: str = "report", cron: str = EVERY_5_MIN, timezone: str = "UTC", **trigger: Any) -> Catalog:
        write_flow(flows_dir, name, NOOP, trigger={"type": "schedule", "cron": cron, "timezone": timezone, **trigger})
        catalog = catalog_factory(flows_dir)
        assert not catalog.problems, catalog.problems
        return catalog

    return write


@pytest.fixture
async def replica(redis_url: str) -> AsyncIterator[Callable[[Catalog], Scheduler]]:
    """A scheduler with its own Redis client and Queue, as another daemon replica would have."""
    clients: list[Redis] = []

    def make(catalog: Catalog) -> Scheduler:
        client = Redis.from_url(redis_url)
        clients.append(client)
        return Scheduler(Queue(client, Keys("fc")), catalog)

    yield make
    for client in clients:
        await client.aclose()


async def executions(queue: Queue) -> list[dict[str, Any]]:
    """Every stored execution's meta, oldest first; checks the ready stream agrees."""
    ids = [meta["id"] for meta in reversed(await queue.recent(100_000))]
    assert await queue.redis.xlen(queue.keys.ready) == len(ids)
    metas = []
    for execution_id in ids:
        stored = await queue.get(execution_id)
        assert stored is not None
        metas.append(stored[0])
    return metas


async def last_fired(queue: Queue, flow: str = "report") -> float | None:
    value = await queue.redis.get(queue.keys.schedule_last(flow))
    return None if value is None else float(value)


# --- Scheduler.tick --------------------------------------------------------------------


async def test_first_sight_fires_nothing_for_the_past(schedule_flow, queue):
    scheduler = Scheduler(queue, schedule_flow())

    wake = await scheduler.tick(T0 + 30)

    assert await executions(queue) == []
    assert await last_fired(queue) == T0 + 30
    assert T0 + 30 < wake <= T0 + 300
    # nothing is due before the next tick either
    await scheduler.tick(T0 + 299)
    assert await executions(queue) == []


async def test_a_due_tick_fires_once_and_the_next_tick_fires_again(schedule_flow, queue):
    scheduler = Scheduler(queue, schedule_flow(payload={"report": "daily"}))
    await scheduler.tick(T0 + 30)

    await scheduler.tick(T0 + 300)
    await scheduler.tick(T0 + 300)  # the same moment again
    await scheduler.tick(T0 + 420)  # later, before the next tick

    [first] = await executions(queue)
    assert first["flow"] == "report"
    assert first["status"] == "queued"
    assert first["trigger"] == {"report": "daily", "tick": iso(T0 + 300), "missed": 0}
    assert await last_fired(queue) == T0 + 300

    await scheduler.tick(T0 + 601)

    first_again, second = await executions(queue)
    assert first_again["id"] == first["id"]
    assert second["trigger"] == {"report": "daily", "tick": iso(T0 + 600), "missed": 0}


async def test_concurrent_replicas_fire_each_tick_exactly_once(schedule_flow, replica, queue):
    catalog = schedule_flow()
    replicas = [replica(catalog) for _ in range(3)]
    await asyncio.gather(*(r.tick(T0 + 30) for r in replicas))
    assert await executions(queue) == []

    await asyncio.gather(*(r.tick(T0 + 300) for r in replicas))

    [only] = await executions(queue)
    assert only["trigger"]["tick"] == iso(T0 + 300)

    await asyncio.gather(*(r.tick(T0 + 600) for r in replicas))
    await asyncio.gather(*(r.tick(T0 + 600) for r in replicas))

    ticks = [meta["trigger"]["tick"] for meta in await executions(queue)]
    assert ticks == [iso(T0 + 300), iso(T0 + 600)]


async def test_replicas_a_little_out_of_step_still_fire_once(schedule_flow, replica, queue):
    catalog = schedule_flow()
    replicas = [replica(catalog) for _ in range(3)]
    await replicas[0].tick(T0 + 30)

    # clocks a few seconds apart, all past the same tick
    await asyncio.gather(*(r.tick(T0 + 300 + skew) for r, skew in zip(replicas, (0.2, 2.5, 4.0), strict=True)))

    [only] = await executions(queue)
    assert only["trigger"] == {"tick": iso(T0 + 300), "missed": 0}


async def test_ticks_missed_while_down_are_coalesced(schedule_flow, queue):
    scheduler = Scheduler(queue, schedule_flow())
    await queue.redis.set(queue.keys.schedule_last("report"), T0 - 3600)

    await scheduler.tick(T0 + 120)

    # 12 ticks came due in the hour (T0-55min … T0): one run for the latest, 11 reported missed
    [only] = await executions(queue)
    assert only["trigger"] == {"tick": iso(T0), "missed": 11}
    assert await last_fired(queue) == T0

    await scheduler.tick(T0 + 300)
    latest = (await executions(queue))[-1]
    assert latest["trigger"] == {"tick": iso(T0 + 300), "missed": 0}


async def test_a_months_long_outage_fires_the_latest_tick_at_once(schedule_flow, queue):
    scheduler = Scheduler(queue, schedule_flow(cron="* * * * *"))
    await queue.redis.set(queue.keys.schedule_last("report"), T0 - 100 * 86400)

    await scheduler.tick(T0 + 30)

    [only] = await executions(queue)
    assert only["trigger"]["tick"] == iso(T0)  # the latest tick, not one from weeks ago
    assert only["trigger"]["missed"] >= 9_999  # counted up to a cap, never walked minute by minute


async def test_coalesced_ticks_fire_once_across_replicas(schedule_flow, replica, queue):
    catalog = schedule_flow()
    await queue.redis.set(queue.keys.schedule_last("report"), T0 - 3600)

    await asyncio.gather(*(replica(catalog).tick(T0 + 120) for _ in range(3)))

    [only] = await executions(queue)
    assert only["trigger"] == {"tick": iso(T0), "missed": 11}


@pytest.mark.parametrize(
    ("midnight_utc", "nine_new_york"),
    [(at(2025, 1, 15), at(2025, 1, 15, 14)), (at(2025, 7, 15), at(2025, 7, 15, 13))],
    ids=["winter-EST-is-14h-UTC", "summer-EDT-is-13h-UTC"],
)
async def test_the_flow_time_zone_is_honoured(schedule_flow, queue, midnight_utc, nine_new_york):
    scheduler = Scheduler(queue, schedule_flow(cron="0 9 * * *", timezone="America/New_York"))
    await queue.redis.set(queue.keys.schedule_last("report"), midnight_utc)

    await scheduler.tick(nine_new_york - 1)
    assert await executions(queue) == []

    await scheduler.tick(nine_new_york)

    [only] = await executions(queue)
    assert only["trigger"] == {"tick": iso(nine_new_york), "missed": 0}


async def test_each_schedule_flow_fires_on_its_own(schedule_flow, flows_dir, queue):
    schedule_flow("hourly", cron="0 * * * *")
    write_flow(flows_dir, "hook", NOOP)
    scheduler = Scheduler(queue, schedule_flow("five", cron=EVERY_5_MIN))
    await scheduler.tick(T0 - 1)

    await scheduler.tick(T0 + 300)

    fired = sorted((meta["flow"], meta["trigger"]["tick"]) for meta in await executions(queue))
    assert fired == [("five", iso(T0 + 300)), ("hourly", iso(T0))]
    assert await last_fired(queue, "hook") is None


async def test_no_schedule_flows_is_quiet(flows_dir, catalog_factory, queue):
    scheduler = Scheduler(queue, catalog_factory(flows_dir))

    wake = await scheduler.tick(T0)

    assert wake > T0
    assert await executions(queue) == []


# --- ticks_between and next_tick ---------------------------------------------------------


def test_ticks_between_excludes_after_and_includes_until():
    assert ticks_between(EVERY_5_MIN, "UTC", T0, T0 + 900) == [T0 + 300, T0 + 600, T0 + 900]
    assert ticks_between(EVERY_5_MIN, "UTC", T0 - 1, T0) == [T0]
    assert ticks_between(EVERY_5_MIN, "UTC", T0, T0 + 299) == []


def test_ticks_between_counts_an_hour_of_five_minute_ticks():
    ticks = ticks_between(EVERY_5_MIN, "UTC", T0 - 3600, T0 + 120)

    assert len(ticks) == 12
    assert ticks[0] == T0 - 3300
    assert ticks[-1] == T0


def test_ticks_between_reads_the_cron_in_the_time_zone():
    winter = ticks_between("0 9 * * *", "America/New_York", at(2025, 1, 13), at(2025, 1, 16))
    summer = ticks_between("0 9 * * *", "America/New_York", at(2025, 7, 13), at(2025, 7, 16))
    kolkata = ticks_between("0 * * * *", "Asia/Kolkata", T0, T0 + 7200)

    assert winter == [at(2025, 1, 13, 14), at(2025, 1, 14, 14), at(2025, 1, 15, 14)]
    assert summer == [at(2025, 7, 13, 13), at(2025, 7, 14, 13), at(2025, 7, 15, 13)]
    # UTC+05:30: the top of a Kolkata hour is half past a UTC one
    assert kolkata == [T0 + 1800, T0 + 5400]


def test_ticks_between_across_a_dst_change_keeps_local_time():
    # New York moved its clocks forward on 2025-03-09: 09:00 local is 14:00 UTC before, 13:00 UTC after
    ticks = ticks_between("0 9 * * *", "America/New_York", at(2025, 3, 8), at(2025, 3, 11))

    assert ticks == [at(2025, 3, 8, 14), at(2025, 3, 9, 13), at(2025, 3, 10, 13)]


def test_next_tick():
    assert next_tick(EVERY_5_MIN, "UTC", T0) == T0 + 300
    assert next_tick(EVERY_5_MIN, "UTC", T0 + 1) == T0 + 300
    assert next_tick(EVERY_5_MIN, "UTC", T0 - 0.5) == T0
    assert next_tick("0 9 * * *", "America/New_York", at(2025, 1, 15, 14)) == at(2025, 1, 16, 14)
    assert next_tick("0 0 1 * *", "UTC", T0) == at(2025, 2, 1)
