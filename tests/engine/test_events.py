"""flowchat.events: the events stream analytics reads, off when analytics is, trimmed only past what was read."""

from __future__ import annotations

import asyncio

from support import stream_events

from flowchat.contacts import Contacts
from flowchat.events import Events
from flowchat.keys import EVENTS_GROUP, Keys

KEYS = Keys("fc")


async def test_analytics_off_writes_no_event(redis) -> None:
    quiet = Contacts(redis, KEYS, events=Events(redis, KEYS, enabled=False))
    await quiet.upsert("+14155550123", name="Ann")
    await asyncio.sleep(0.01)
    assert not await redis.exists(KEYS.events)


async def test_the_stream_is_trimmed_only_up_to_what_analytics_has_not_acknowledged(events, redis) -> None:
    for n in range(10):  # one entry each (events emitted in one loop turn would share one)
        events.emit("metric", None, {"name": "m", "value": n, "tags": {}})
        await events.flush()
    assert await events.trim() == 0  # nothing read yet: nothing goes
    read = await redis.xreadgroup(EVENTS_GROUP, "sink", {KEYS.events: ">"}, count=6)
    ids = [entry_id for entry_id, _ in read[0][1]]
    await redis.xack(KEYS.events, EVENTS_GROUP, *ids[:3])  # 3 acknowledged, 3 read but pending
    await events.trim()
    left = [entry_id for entry_id, _ in await redis.xrange(KEYS.events)]
    assert left[0] == ids[3] and len(left) == 7
    await redis.xack(KEYS.events, EVENTS_GROUP, *ids[3:])
    await events.trim()
    assert len(await redis.xrange(KEYS.events)) >= 4  # the 4 never delivered stay
    stats = await events.stats()
    assert stats["length"] >= 4 and stats["age_seconds"] >= 0


async def test_events_of_one_loop_turn_leave_as_one_entry_and_unpack_in_order(events, redis) -> None:
    for n in range(3):
        events.emit("metric", None, {"name": "m", "value": n, "tags": {}})
    await events.flush()
    [(entry_id, fields)] = await redis.xrange(KEYS.events)
    assert fields[b"type"] == b"batch"
    found = stream_events([(entry_id, fields)])
    assert [(e["type"], e["data"]["value"]) for e in found] == [("metric", 0), ("metric", 1), ("metric", 2)]
    assert [e["id"] for e in found] == [f"stream-{entry_id.decode()}:{n}" for n in range(3)]


async def test_an_event_that_cannot_be_encoded_is_logged_and_the_others_of_its_turn_are_written(
    events, redis, caplog
) -> None:
    deep: list[object] = []
    for _ in range(300):  # deeper than orjson writes (it reads up to 1024 levels: a webhook body can be)
        deep = [deep]
    events.emit("metric", None, {"name": "before", "value": 1, "tags": {}})
    events.emit("metric", None, {"name": "deep", "value": deep, "tags": {}})
    events.emit("metric", None, {"name": "huge", "value": 2**70, "tags": {}})  # {{ 2 ** 70 }}: over 64 bits
    events.emit("metric", None, {"name": "after", "value": 2, "tags": {}})
    await events.flush()
    found = stream_events(await redis.xrange(KEYS.events))
    assert [e["data"]["name"] for e in found] == ["before", "after"]
    assert "an event was not written" in caplog.text
