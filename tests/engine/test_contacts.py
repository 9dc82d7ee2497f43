"""flowchat.contacts: the contact book against a real Redis (indexes, audit trail, contact events)."""

from __future__ import annotations

import asyncio

import pytest
from support import stream_events

from flowchat.contacts import Contacts
from flowchat.keys import Keys

KEYS = Keys("fc")


@pytest.fixture
def book(redis, events) -> Contacts:
    return Contacts(redis, KEYS, default_region="US", events=events)


async def event_list(redis) -> list[dict[str, object]]:
    await asyncio.sleep(0.01)  # appends are not awaited: let the batch leave
    return stream_events(await redis.xrange(KEYS.events))


async def test_upsert_update_tag_consent_and_the_audit_trail(book, redis) -> None:
    contact, created = await book.upsert("415 555 0123", name="Ann", attributes={"plan": "pro", "big": 2**60})
    assert created and contact["phone"] == "+14155550123" and contact["attributes"]["big"] == 2**60
    again, created_again = await book.upsert("+14155550123", name="Ann", attributes={"plan": "pro"})
    assert not created_again and again["created_at"] == contact["created_at"]
    updated = await book.update("+14155550123", attributes={"city": "SF"}, unset=["plan"])
    assert updated["attributes"] == {"big": 2**60, "city": "SF"}
    tagged = await book.tag("+14155550123", add=["vip", "lead", "vip"], remove=["none"], groups_add=["west"])
    assert (tagged.tags_added, tagged.tags_removed, tagged.contact["groups"]) == (["vip", "lead"], [], ["west"])
    assert (await book.tag("+14155550123", remove=["lead"])).tags_removed == ["lead"]
    consented = await book.set_consent("+14155550123", "opted_in", "web-form")
    assert consented["consent"]["state"] == "opted_in" and consented["consent"]["source"] == "web-form"
    assert consented["consent"]["at"] >= contact["created_at"]
    details = await book.details("+14155550123", audit=100)
    assert details is not None
    assert [entry["action"] for entry in details["audit"]] == ["consent", "tag", "tag", "update", "upsert"]
    assert details["audit"][-1]["created"] is True
    for n in range(120):
        await book.update("+14155550123", attributes={"n": n})
    assert await redis.llen(KEYS.contact_audit("+14155550123")) == 100


async def test_contact_events_name_each_change_with_the_full_phone(book, redis) -> None:
    await book.upsert("+14155550123", name="Ann")
    await book.upsert("+14155550123", name="Ann")  # no change: no event
    await book.tag("+14155550123", add=["vip"], groups_add=["west"])
    await book.set_consent("+14155550123", "opted_out", "STOP")
    await book.erase("+14155550123")
    events = await event_list(redis)
    assert [e["data"]["action"] for e in events] == ["created", "tagged", "grouped", "opted_out", "erased"]
    assert all(e["type"] == "contact" and e["data"]["phone"] == "+14155550123" for e in events)
    assert len({e["id"] for e in events}) == len(events)
    assert events[3]["data"]["source"] == "STOP"


async def test_search_reads_indexes_and_erase_removes_every_trace(book, redis) -> None:
    for n in range(30):
        await book.tag(f"+1415555{n:04d}", add=["even" if n % 2 == 0 else "odd"], groups_add=[f"g{n % 3}"])
    await book.set_consent("+14155550004", "opted_out", "STOP")
    assert len(await book.search(tags=["even"], limit=100)) == 15
    assert await book.search(tags=["even"], groups=["g0"]) == [f"+1415555{n:04d}" for n in (0, 6, 12, 18, 24)]
    assert await book.search(opted_out=True) == ["+14155550004"]
    assert len(await book.search(tags=["odd"], limit=4)) == 4
    assert await book.erase("+14155550004")
    assert not await book.erase("+14155550004")
    assert await book.get("+14155550004") is None
    assert "+14155550004" not in await book.search(tags=["even"], limit=100)
    assert await book.search(opted_out=True) == []
    leftovers = [k for k in await redis.keys("*") if b"0004" in k]
    assert leftovers == []


async def test_an_inbound_message_is_recorded_once(book) -> None:
    first = await book.record_inbound("whatsapp:+14155550123", profile_name="Ann", message_sid="SM1", at_ms=1000)
    repeat = await book.record_inbound("whatsapp:+14155550123", profile_name="Bob", message_sid="SM1", at_ms=2000)
    assert first["created"] and not repeat["created"]
    contact = await book.get("+14155550123")
    assert contact is not None and contact["name"] == "Ann" and contact["last_inbound_at"] == 1000
